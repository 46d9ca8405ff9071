"""Mixed forwards: rows fed different numbers of tokens in one forward (decode rows beside a prefill chunk).

A `StreamBatch` forward gives every row the same number of tokens. A server's round has decoding
rows (one token each) and, now and then, a new prompt (a chunk of many tokens for one row). Run
apart, the chunk is a second forward whose linear layers read every weight again; run together,
the rows' tokens are laid end to end as ONE sequence (batch 1, T tokens), so every token-wise
part of the model (embeddings, norms, rotary, linear layers, MLP) runs once over all T tokens,
and only the attention is split: `prepare` names the groups (rows, tokens per row) and gives the
position ids; in each layer `attend` cuts the query, keys and values back into the groups and
runs each group through the layer's usual write / plan / attention / commit, exactly as a forward
of that group alone would (the groups' rows are disjoint, so their order does not matter), then
lays the outputs end to end again. Each row's logits therefore equal its stream alone
(`tests/test_batch.py`), as in an equal-length batched forward; bit for bit on a quantized model
where its linears pick the same kernel for the T tokens as for each stream's own count
(`StreamBatch.mixes_exactly`).

This is what vLLM's scheduler does with chunked prefill (prefill tokens ride in the decode
batch, under one token budget). On the CPU the packed int4 kernel's cost grows with the tokens
anyway, so what a ride saves is one forward's fixed cost (the server's measurements:
docs/server_measurements.md).

What it does NOT do: choose the groups (the scheduler does), sample, or support recall (batched
caches have none).
"""

from __future__ import annotations

import torch


def prepare(cache, groups: list[tuple[tuple[int, ...], int]], device) -> torch.Tensor:
    """Start a mixed forward over `groups` [(rows, tokens per row), ...], rows disjoint across
    groups (`StreamBatch.feed_mixed` checks that): position ids (1, T), each group's rows in order,
    each row's tokens in order."""
    cache.start_forward(groups)
    pos = [torch.arange(n) + cache.first_position(r, n) for rows, n in groups for r in rows]
    return torch.cat(pos)[None].to(device)


def attend(query: torch.Tensor, layer, cache, run) -> torch.Tensor:
    """One layer's attention of a mixed forward: `query` (1, Hq, T, D); `run(query, plan)` attends
    one group as `planned_attention` does. Returns (1, Hq, T, D)."""
    keys, values = layer.mixed
    layer.mixed = None
    outs, start = [], 0
    for rows, n in cache.groups:
        span = slice(start, start + len(rows) * n)
        start = span.stop

        def cut(x, span=span, b=len(rows), n=n):  # (1, H, T, D) -> this group's (B, H, n, D)
            return x[0, :, span].unflatten(1, (b, n)).transpose(0, 1)

        cache.use_rows(rows)
        layer.write(cut(keys), cut(values))
        q = cut(query)
        out = run(q, layer.plan(q))
        layer.commit()
        outs.append(out.transpose(0, 1).flatten(1, 2))  # (Hq, B*n, D)
    return torch.cat(outs, dim=1)[None]
