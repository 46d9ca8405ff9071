"""A slow, literal implementation of the paper's streaming attention (the test oracle).

Xiao et al. (2024), Sec. 3.2: the KV cache keeps the first S tokens and the last W; keys are cached
*before* RoPE and positions are re-assigned within the cache at every step: if the cache holds
tokens [0,1,2,3,6,7,8] and token 9 is decoded, positions [0..7] are used. Computed token by token,
in float64, with its own rotation code; shares nothing with the engine.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "reference_paper"


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """float64 RoPE (rotate_half layout) of x (..., T, D) at positions pos (T,); partial rotary."""
    r = 2 * inv_freq.numel()
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    xr, xp = x[..., :r], x[..., r:]
    half = r // 2
    turned = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * ang.cos() + turned * ang.sin(), xp], dim=-1)


class PaperReference:
    """Streams tokens one at a time through `model` with the paper's cache; returns logits."""

    def __init__(self, model, sinks: int, window: int, rotary_module):
        self.model, self.sinks, self.window, self.rotary = model, sinks, window, rotary_module
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pre-RoPE keys, values
        self.n = 0
        AttentionInterface.register(NAME, self._attention)

    def _inv_freq(self, module):
        types = getattr(module.config, "layer_types", None)
        if types is not None and hasattr(self.rotary, f"{types[module.layer_idx]}_inv_freq"):
            return getattr(self.rotary, f"{types[module.layer_idx]}_inv_freq")
        return self.rotary.inv_freq

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, **kwargs):
        inv = self._inv_freq(module)
        s, w = (0, sliding_window) if sliding_window else (self.sinks, self.window)
        pos_q = torch.tensor([self.query_pos])
        k_pre = _rotate(key.double(), -pos_q, inv)  # un-rotate: cache keys before RoPE
        q_pre = _rotate(query.double(), -pos_q, inv)
        ks, vs = self.layers.get(module.layer_idx, (k_pre[:, :, :0], value.double()[:, :, :0]))
        ks, vs = torch.cat([ks, k_pre], 2), torch.cat([vs, value.double()], 2)
        if ks.shape[2] > s + w:  # evict: keep the first s and the last w
            ks = torch.cat([ks[:, :, :s], ks[:, :, -w:]], 2)
            vs = torch.cat([vs[:, :, :s], vs[:, :, -w:]], 2)
        self.layers[module.layer_idx] = (ks, vs)
        return self._attend(module, query, q_pre, ks, vs, inv, scaling, softcap)

    def _attend(self, module, query, q_pre, ks, vs, inv, scaling, softcap):
        """Attention of the pre-RoPE query over the pre-RoPE cache (ks, vs), positions 0..L-1 in
        cache order, the query at L-1."""
        L = ks.shape[2]
        k_rot = _rotate(ks, torch.arange(L), inv)  # positions within the cache, every step
        q_rot = _rotate(q_pre, torch.tensor([L - 1]), inv)
        rep = query.shape[1] // ks.shape[1]
        k_rot, vv = k_rot.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        scores = q_rot @ k_rot.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if getattr(module.config, "softmax_off_by_one", False):
            probs = scores.exp() / (1 + scores.exp().sum(-1, keepdim=True))
        else:
            probs = scores.softmax(-1)
        return (probs @ vv).to(query.dtype).transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        """Logits (T, V) for each token fed, one forward per token."""
        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        try:
            out = []
            for tok in ids:
                # The query's position is its index in the cache after eviction. Sliding layers
                # (s=0) see the same distances under any consecutive positions.
                self.query_pos = min(self.n, self.sinks + self.window - 1)
                logits = self.model(torch.tensor([[int(tok)]]), position_ids=torch.tensor([[self.query_pos]]),
                                    use_cache=False).logits
                out.append(logits[0, -1].float())
                self.n += 1
            return torch.stack(out)
        finally:
            self.model.set_attn_implementation(old)


class RecallReference(PaperReference):
    """The recall rule, literally: each global layer's cache is [the S sinks, the chosen blocks in
    stream order, the W most recent tokens], every token re-positioned 0..L-1 in that order at
    every step, the query at L-1. It keeps the pre-RoPE keys of the whole stream and takes the
    chosen block ids from the engine: `traces[layer]` is a list of (first stream index, tokens,
    block ids) per engine forward (block b = stream tokens S + b*B .. S + (b+1)*B - 1); token t
    uses the last record covering it. With per-KV-head selection the record holds one tuple of
    block ids per KV head, and each KV head's cache is [sinks, its own blocks in stream order,
    window], positioned the same way. Sliding-window layers are plain sliding windows."""

    def __init__(self, model, sinks: int, window: int, block_size: int, rotary_module, traces: dict):
        super().__init__(model, sinks, window, rotary_module)
        self.block, self.traces = block_size, traces
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def chosen(self, layer: int, t: int) -> tuple:
        hits = [ids for first, n, ids in self.traces[layer] if first <= t < first + n]
        assert hits, f"no engine forward covers token {t} in layer {layer}"
        return tuple(hits[-1])

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, **kwargs):
        if sliding_window:
            return super()._attention(module, query, key, value, attention_mask, scaling, dropout,
                                      sliding_window, softcap, **kwargs)
        inv = self._inv_freq(module)
        s, w, b, t = self.sinks, self.window, self.block, self.n
        pos_q = torch.tensor([self.query_pos])
        k_pre, q_pre = _rotate(key.double(), -pos_q, inv), _rotate(query.double(), -pos_q, inv)
        ks, vs = self.history.get(module.layer_idx, (k_pre[:, :, :0], value.double()[:, :, :0]))
        ks, vs = torch.cat([ks, k_pre], 2), torch.cat([vs, value.double()], 2)
        self.history[module.layer_idx] = (ks, vs)
        window = list(range(max(s, t - w + 1), t + 1))
        chosen = self.chosen(module.layer_idx, t)
        per_head = chosen if chosen and isinstance(chosen[0], tuple) else (chosen,) * ks.shape[1]
        keeps = []
        for ids in per_head:  # one cache per KV head: sinks, its blocks in stream order, the window
            recalled = [s + i * b + m for i in sorted(ids) for m in range(b)]
            assert not recalled or max(recalled) < window[0], "a recalled token is still in the window"
            keeps.append(torch.tensor(list(range(min(s, t + 1))) + recalled + window))
        kh = torch.stack([ks[:, h, keep] for h, keep in enumerate(keeps)], 1)
        vh = torch.stack([vs[:, h, keep] for h, keep in enumerate(keeps)], 1)
        return self._attend(module, query, q_pre, kh, vh, inv, scaling, softcap)
