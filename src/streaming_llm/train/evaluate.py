"""Evaluation of the pre-trained variants on held-out text.

- `validation_loss`: dense next-token loss on fixed held-out windows, scored exactly like training.
- `streaming_nlls`: per-token NLL of a held-out stream several times the training context, run
  through the project's streaming engine (`streaming_llm.core.engine.StreamingLLM`) with S sinks and a
  fixed window W. For the sink-token variant the stream starts with `<sink>`, which is then the
  first sink; every variant is scored on the same text targets.
- `first_position_share`: per layer, the attention probability on position 0 (mean over heads and
  over queries in the second half of each window), from a dense forward with the reference
  attention; for softmax-off-by-one also the share given to the virtual zero slot.

It does NOT implement streaming: that is the engine's job.
"""

from __future__ import annotations

import math

import numpy as np

from .loop import lm_loss, make_batch
from .model import EXPLICIT_ATTN, register_attention, use_training_attention

def window_offsets(n_tokens: int, context: int, n_windows: int) -> np.ndarray:
    """Evenly spaced, deterministic sample offsets over held-out tokens."""
    high = n_tokens - (context + 1)
    if high < 0:
        raise ValueError(f"held-out text has {n_tokens} tokens, fewer than one window of {context + 1}")
    return np.unique(np.linspace(0, high, num=max(1, n_windows)).astype(np.int64))


def validation_loss(model, val_ids: np.ndarray, context: int, sink_id: int | None, n_windows: int, batch_size: int = 8) -> float:
    import torch

    use_training_attention(model).eval()
    offsets = window_offsets(len(val_ids), context, n_windows)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(offsets), batch_size):
            inputs, targets = make_batch(val_ids, offsets[i : i + batch_size], context, sink_id)
            total += float(lm_loss(model, inputs, targets)) * targets.numel()
            count += targets.numel()
    return total / count


def stream_for(val_ids: np.ndarray, n_tokens: int, sink_id: int | None, start: list[int] | tuple = ()) -> tuple[np.ndarray, int]:
    """(stream, first scored index): the held-out stream, after `start` (the BOS rule's prefix,
    `special_tokens.stream_prefix`: empty for this project's tokenizers, which add no BOS) and
    `<sink>` for that variant.

    Scored are the predictions of stream[first+1:], i.e. of text tokens 1.. for every variant."""
    text = np.asarray(val_ids[:n_tokens], dtype=np.int64)
    prefix = list(start) + ([] if sink_id is None else [sink_id])
    if not prefix:
        return text, 0
    return np.concatenate([np.asarray(prefix, dtype=np.int64), text]), len(prefix)


def streaming_nlls(model, tokenizer, stream: np.ndarray, first: int, sinks: int, window: int, chunk_size: int = 256) -> np.ndarray:
    """NLL (nats) of each next token stream[first+1:], streamed with `sinks` + `window` cache."""
    from ..core.config import StreamingConfig
    from ..core.engine import StreamingLLM
    from ..eval.ppl import token_nlls

    config = StreamingConfig(method="streaming", sinks=sinks, window=window, chunk_size=chunk_size)
    engine = StreamingLLM(model, tokenizer, config)  # switches the model to the engine's attention
    nll = np.array([v for _, _, v in token_nlls(engine, stream)], dtype=np.float64)  # predictions of stream[1:]
    return nll[first:]


def ppl(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


def first_position_share(model, val_ids: np.ndarray, context: int, sink_id: int | None, n_windows: int = 4) -> dict:
    """Per-layer attention share on position 0 (and on the zero slot, for off-by-one)."""
    import torch

    register_attention()
    model.set_attn_implementation(EXPLICIT_ATTN)
    offsets = window_offsets(len(val_ids), context, n_windows)
    inputs, _ = make_batch(val_ids, offsets, context, sink_id)
    try:
        with torch.inference_mode():
            out = model(input_ids=inputs, output_attentions=True, use_cache=False)
    finally:
        use_training_attention(model)
    length = inputs.shape[1]
    q0 = length // 2
    first, null = [], []
    for probs in out.attentions:  # (B, H, L, L) per layer
        rows = probs[:, :, q0:, :].double()
        first.append(round(float(rows[..., 0].mean()), 5))
        null.append(round(float((1.0 - rows.sum(-1)).mean()), 5))
    result = {"first_position_share": first, "queries": f"positions {q0}..{length - 1} of {len(offsets)} windows"}
    if getattr(model.config, "softmax_off_by_one", False):
        result["zero_slot_share"] = null
    return result
