"""Small Llama-style causal LMs in three variants that differ only in the attention sink.

- `vanilla`: a plain Llama model.
- `sink_token`: the same model; the training samples get a learnable `<sink>` vocabulary entry at
  position 0 (see `loop.make_batch`). Its config records `attention_sink_token_id` so a streaming
  evaluator knows to prepend that token.
- `softmax_off_by_one`: attention with an extra 1 in the softmax denominator, i.e. a virtual key
  whose score is 0 and whose value is zero ("zero sink", Miller 2023). The config stores
  `softmax_off_by_one: true`; the streaming engine reads that flag. For training and for plain
  forwards this module registers the attention function `sdpa_off_by_one`.

`explicit_attention` (registered as `explicit_probs`) is a slow reference that returns the attention
probabilities for every variant, used to measure the attention share on position 0.

It does NOT train or evaluate (see `loop`, `evaluate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

VARIANTS = ("vanilla", "sink_token", "softmax_off_by_one")
OFF_BY_ONE_ATTN = "sdpa_off_by_one"
EXPLICIT_ATTN = "explicit_probs"


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    context: int  # training sample length in text tokens (the sink variant adds one position)

    def to_dict(self) -> dict:
        return asdict(self)


SIZES = {
    # about 4.2M parameters (1M of them the tied embedding)
    "default": ModelSize(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, context=256),
    "quick": ModelSize(vocab_size=2048, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, context=128),
    "tiny": ModelSize(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context=32),
}


def register_attention() -> None:
    """Register this module's attention functions with transformers (idempotent)."""
    from transformers import AttentionInterface

    for name, fn in ((OFF_BY_ONE_ATTN, sdpa_off_by_one), (EXPLICIT_ATTN, explicit_attention)):
        if AttentionInterface._global_mapping.get(name) is not fn:
            AttentionInterface.register(name, fn)


def _visible(c: int, n: int, attention_mask, device) -> torch.Tensor:
    """(C, N) or (B, 1, C, N) bool mask, True = visible: causal, queries aligned to the key end."""
    qi = torch.arange(n - c, n, device=device)[:, None]
    mask = torch.arange(n, device=device)[None, :] <= qi  # (C, N)
    if attention_mask is not None:  # a prepared 4D mask (bool, or additive with 0 = visible)
        extra = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask & extra[..., -c:, -n:]
    return mask


def sdpa_off_by_one(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax-off-by-one attention: softmax over [0, scores] with the extra slot's value zero.

    query (B, H, C, D); key/value (B, Hkv, N, D). A zero key scores exactly q.0 = 0, so one
    prepended zero key/value pair, visible to every query, is the off-by-one denominator.
    """
    b, h, c, d = query.shape
    n = key.shape[-2]
    zero_k = key.new_zeros(b, key.shape[1], 1, d)
    zero_v = value.new_zeros(b, value.shape[1], 1, value.shape[-1])
    key = torch.cat([zero_k, key], dim=-2)  # (B, Hkv, 1+N, D)
    value = torch.cat([zero_v, value], dim=-2)
    mask = _visible(c, n, attention_mask, query.device)
    mask = torch.cat([torch.ones_like(mask[..., :1]), mask], dim=-1)  # the zero slot: always visible
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=key.shape[1] != h,
    )  # (B, H, C, D)
    return out.transpose(1, 2).contiguous(), None


def explicit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference attention returning probabilities (B, H, C, N); honours `softmax_off_by_one`."""
    off_by_one = bool(getattr(module.config, "softmax_off_by_one", False))
    h, c, n = query.shape[1], query.shape[-2], key.shape[-2]
    rep = h // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale  # (B, H, C, N)
    scores = scores.masked_fill(~_visible(c, n, attention_mask, query.device), float("-inf"))
    if off_by_one:
        scores = torch.cat([scores.new_zeros(*scores.shape[:-1], 1), scores], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if off_by_one:
        probs = probs[..., 1:]  # rows now sum to less than 1: the rest went to "nothing"
    out = probs.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), probs


def model_config(size: ModelSize, variant: str, sink_token_id: int | None = None, eot_id: int = 0):
    from transformers import LlamaConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    extra = {}
    if variant == "sink_token":
        extra["attention_sink_token_id"] = int(sink_token_id)
    if variant == "softmax_off_by_one":
        extra["softmax_off_by_one"] = True
    return LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.context + 1,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pretraining_variant=variant,
        **extra,
    )


def build_model(size: ModelSize, variant: str, seed: int, sink_token_id: int | None = None):
    """A freshly initialised model; the same seed gives the same weights for every variant."""
    from transformers import LlamaForCausalLM

    config = model_config(size, variant, sink_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return use_training_attention(model)


def use_training_attention(model):
    """Switch a model to the attention its variant was trained with."""
    if getattr(model.config, "softmax_off_by_one", False):
        register_attention()
        model.set_attn_implementation(OFF_BY_ONE_ATTN)
    else:
        model.set_attn_implementation("sdpa")
    return model


def load_trained(path):
    """Load a model saved by `pretrain` with the right attention (plain from_pretrained would
    silently use ordinary softmax for the off-by-one variant)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path))
    return use_training_attention(model).eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
