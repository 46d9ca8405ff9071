"""The attention function registered with transformers, and `enable(model)` to switch a model to it.

It is one function for every method: given a `StreamingCache` (the forward keyword argument
`streaming_cache`, which transformers passes through to the attention function) it attends as the
`AttentionPlan` of the cache's layer `module.layer_idx` says (sinks scored against a
position-shifted query, window as is, one softmax over both; every batch row is its own stream,
with its own mask and sink rotation); without one (plain forward, `DynamicCache`, training) it is
ordinary causal attention, sliding-window aware, aligned to the end of the key sequence. It never
changes model code: the hook points are `AttentionInterface.register` and
`set_attn_implementation`, and because no mask function is registered under this name,
transformers builds no mask at all. It keeps no state of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from . import mixed
from ..models import native
from .cache import KWARG
from .plan import AttentionPlan
from .rope import apply_rotation

NAME = "streaming_llm"


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Register the streaming attention and switch `model` to it (idempotent)."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, streaming_attention)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    return model


def streaming_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, Hq, C, D), rotated at the positions the model was called with
    key: torch.Tensor,  # (B, Hkv, N, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("models with learned attention-sink logits (s_aux) are not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    off_by_one = bool(getattr(getattr(module, "config", None), "softmax_off_by_one", False))
    cache = kwargs.get(KWARG)
    if cache is None:
        out = causal_attention(query, key, value, attention_mask, scale, softcap, sliding_window, off_by_one)
    elif cache.groups is not None:  # rows fed different numbers of tokens (mixed.py)
        out = mixed.attend(query, cache.layers[module.layer_idx], cache,
                           lambda q, plan: planned_attention(q, plan, scale, softcap))
    else:
        layer = cache.layers[module.layer_idx]
        out = planned_attention(query, layer.plan(query), scale, softcap)
        layer.commit()
    return out.transpose(1, 2).contiguous(), None


def planned_attention(q: torch.Tensor, plan: AttentionPlan, scale: float, softcap: float | None) -> torch.Tensor:
    if plan.keys.dtype != q.dtype:  # a lower-precision KV cache (decode): attend in its dtype
        return planned_attention(q.to(plan.keys.dtype), plan, scale, softcap).to(q.dtype)
    if plan.causal:  # nothing evicted yet: what dense attention does
        return causal_attention(q, plan.keys, plan.values, None, scale, softcap, None, plan.zero_slot)
    if plan.sink_delta is None and softcap is None:  # decode: one fused kernel over the whole buffer
        if plan.row_lengths is not None or (plan.mask is None and q.shape[2] == 1):  # rows at any stages, or full
            lengths = plan.row_lengths or (plan.keys.shape[2],) * q.shape[0]
            return single_query_attention(q, plan.keys, plan.values, lengths, scale)
        mask = None if plan.mask is None else plan.mask[:, None]  # (B, 1, 1, N)
        return F.scaled_dot_product_attention(q, plan.keys, plan.values, attn_mask=mask, scale=scale, enable_gqa=True)
    if plan.sink_delta is None:
        return grouped_attention(q, plan.keys, plan.values, plan.mask, scale, softcap, plan.zero_slot)
    b, c = plan.sink_delta.shape
    cos, sin = plan.rope.cos_sin(plan.sink_delta.reshape(-1), q.dtype)  # (B*C, R)
    q_sink = apply_rotation(q, cos.reshape(b, 1, c, -1), sin.reshape(b, 1, c, -1), plan.rope.interleaved)
    if softcap is None and not plan.zero_slot and plan.window_rows_nonempty and _FLASH_CPU is not None \
            and q.device.type == "cpu":
        return fused_chunk_attention(q, q_sink, plan, scale)
    return grouped_attention(
        q,
        plan.keys,
        plan.values,
        plan.mask,
        scale,
        softcap,
        plan.zero_slot,
        q_sink=q_sink,
        sink_keys=plan.sink_keys,
        sink_values=plan.sink_values,
        sink_mask=plan.sink_mask,
    )


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths, scale: float):
    """q (B, Hq, 1, D), row i unmasked over keys/values[i, :, :lengths[i]] - rows at different stages
    each over exactly its own slots, what its stream does alone: the native kernel (`models/native.py`: all
    rows in one call, a row's bits independent of the others) where it applies, else torch's SDPA,
    one call per run of rows of the same length (a slice of the buffers, no copy). A stream alone
    and the same stream in a batch both come here, so they take the same kernel and get the same
    bits. One masked call over the longest row would be simpler, but torch's fused kernel's sums
    depend on the key length (padding with masked keys changes the last bits in 136 of 300 random
    trials, bfloat16), and a bfloat16 model's next linear layer rounds its input, so such a
    difference can turn a greedy reply: with it, replies batched beside other streams did not stay
    the text of the same stream alone."""
    out = native.decode(q, keys, values, lengths, scale)
    if out is not None:
        return out
    outs, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n = lengths[i]
        outs.append(F.scaled_dot_product_attention(q[i:j], keys[i:j, :, :n], values[i:j, :, :n],
                                                   scale=scale, enable_gqa=True))
        i = j
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# The CPU flash-attention kernel that also returns the log-sum-exp of each query's scores (what
# merging the window's softmax with the sinks' needs); public SDPA does not return it.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_chunk_attention(q: torch.Tensor, q_sink: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """The chunk path of `grouped_attention` (one softmax over sinks and window) without
    materializing the (C, N) scores: the window goes through the fused flash kernel, which
    returns its output and log-sum-exp; the few sink scores are computed directly and merged:
    out = (e^lse * out_window + sum_j e^s_j v_j) / (e^lse + sum_j e^s_j). Needs every query
    to see at least one window key (finite lse); `planned_attention` checks that."""
    b, hq, c, d = q.shape
    hkv = plan.keys.shape[1]
    g = hq // hkv
    k, v = plan.keys, plan.values
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = plan.mask if plan.mask.dim() == 3 else plan.mask[None]  # (B or 1, C, N)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))[:, None]
    out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    n_sink = plan.sink_keys.shape[-2]
    if n_sink == 0:
        return out
    sq = q_sink.reshape(b, hkv, g, c, d).float()
    s = (sq @ plan.sink_keys.float().unsqueeze(2).transpose(-1, -2)).reshape(b, hq, c, n_sink) * scale
    sink_mask = plan.sink_mask if plan.sink_mask.dim() == 3 else plan.sink_mask[None]
    s = s.masked_fill(~sink_mask[:, None], float("-inf"))
    lse = lse.float().unsqueeze(-1)  # (B, Hq, C, 1)
    top = torch.maximum(lse, s.amax(-1, keepdim=True))
    w_win, w_sink = torch.exp(lse - top), torch.exp(s - top)
    sink_out = (w_sink.reshape(b, hkv, g, c, n_sink) @ plan.sink_values.float().unsqueeze(2)).reshape(b, hq, c, -1)
    merged = (out.float() * w_win + sink_out) / (w_win + w_sink.sum(-1, keepdim=True))
    return merged.to(v.dtype)


def grouped_attention(
    q: torch.Tensor,  # (B, Hq, C, D)
    k: torch.Tensor,  # (B, Hkv, N, D)
    v: torch.Tensor,  # (B, Hkv, N, Dv)
    mask: torch.Tensor | None,  # (C, N) or (B, C, N) bool, True = visible
    scale: float,
    softcap: float | None = None,
    zero_slot: bool = False,
    q_sink: torch.Tensor | None = None,  # (B, Hq, C, D): the query as the sinks see it
    sink_keys: torch.Tensor | None = None,  # (B, Hkv, S, D)
    sink_values: torch.Tensor | None = None,
    sink_mask: torch.Tensor | None = None,  # (C, S) or (B, C, S)
) -> torch.Tensor:
    """Softmax attention over [sinks | keys] in one softmax; grouped-query heads share K/V
    without copies. `zero_slot` adds a key of score 0 and value 0 (softmax-off-by-one)."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, c, d)  # (B, Hkv, G, C, D)
    scores = qg @ k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, C, N)
    n_sink = 0 if sink_keys is None else sink_keys.shape[-2]
    if n_sink:
        sq = q_sink.reshape(b, hkv, g, c, d)
        scores = torch.cat([sq @ sink_keys.unsqueeze(2).transpose(-1, -2), scores], dim=-1)
        if mask is None:
            mask = torch.ones(c, k.shape[-2], dtype=torch.bool, device=q.device)
        masks = [torch.broadcast_to(x, (b, c, x.shape[-1])) for x in (sink_mask, mask)]
    else:
        masks = [] if mask is None else [mask]
    scores = scores.float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if masks:
        full = torch.cat(masks, dim=-1)  # (C, S+N) or (B, C, S+N)
        full = full[:, None, None] if full.dim() == 3 else full
        scores = scores.masked_fill(~full, float("-inf"))
    if zero_slot:
        scores = torch.cat([scores, scores.new_zeros(*scores.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if zero_slot:
        probs = probs[..., :-1]
    out = probs[..., n_sink:] @ v.unsqueeze(2)
    if n_sink:
        out = out + probs[..., :n_sink] @ sink_values.unsqueeze(2)
    return out.reshape(b, hq, c, v.shape[-1])


def causal_attention(q, k, v, attention_mask, scale, softcap, sliding_window, off_by_one):
    """Ordinary causal attention, queries aligned to the end of the keys, optional sliding window."""
    c, n = q.shape[-2], k.shape[-2]
    if attention_mask is None and softcap is None and not off_by_one and sliding_window is None and (c == n or c == 1):
        if c == 1:  # is_causal aligns to the top left, so a single (last) query goes unmasked
            return single_query_attention(q, k, v, (n,) * q.shape[0], scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    qi = torch.arange(n - c, n, device=q.device)[:, None]
    ki = torch.arange(n, device=q.device)[None, :]
    mask = ki <= qi
    if sliding_window is not None:
        mask = mask & (ki > qi - sliding_window)
    if attention_mask is not None:  # a prepared 4D mask (bool or additive), broadcast over heads
        extra = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask & extra[0, 0, :, -n:]
    if softcap is None and not off_by_one:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return grouped_attention(q, k, v, mask, scale, softcap, off_by_one)
