"""One pass-key probe of recall on the default model (not an evaluation: one prompt, one key).

A 5-digit key is stated first, then ~275 tokens of filler, then the question, primed with
"The pass key is"; greedy decoding, 6 tokens, per method. With a 4+124 cache the key has been
evicted when the question comes. `reproduce passkey` (issue 15) is the grid this only samples.

    PYTHONPATH=src python benchmarks/recall_probe.py
"""

from __future__ import annotations

import torch

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.sampling import SamplingParams
from streaming_llm.models.loading import load_model

METHODS = {
    "dense": dict(method="dense"),
    "streaming 4+124": dict(sinks=4, window=124),
    "streaming 4+124, recall 2x32": dict(sinks=4, window=124, recall_blocks=2, block_size=32),
    "streaming 4+124, recall 4x32": dict(sinks=4, window=124, recall_blocks=4, block_size=32),
    "streaming 4+124, recall 8x16": dict(sinks=4, window=124, recall_blocks=8, block_size=16),
}


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m-instruct")
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12
    text = "The pass key is 71432. Remember it. " + filler + "What is the pass key? The pass key is"
    ids = tok(text, add_special_tokens=False)["input_ids"]  # SmolLM2 streams start without BOS
    print(f"prompt tokens: {len(ids)}; key 71432")
    for name, kw in METHODS.items():
        engine = StreamingLLM(model, tok, StreamingConfig(**kw))
        reply = "".join(t.text for t in engine.generate(ids, 6, SamplingParams(temperature=0.0, repetition_penalty=1.0)))
        print(f"{name:30s} {reply!r}  {'found' if '71432' in reply else 'missed'}")


if __name__ == "__main__":
    main()
