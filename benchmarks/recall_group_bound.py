"""Would a coarse index over groups of blocks make recall's scan cheaper? A measurement, not a feature.

An exact two-level selection would keep, per group of G consecutive blocks, the per-channel max of
the blocks' max keys and min of their min keys, score the groups with the same Quest bound, and
open a group (score its blocks) only while its bound can still beat the K-th best block found so
far: every group whose bound is at least the K-th best block's score must be opened. This script
streams `--fill` tokens of the Gutenberg corpus into one recall engine, then feeds a question and
a few greedy tokens, and for every layer's choice on those forwards prints the fraction of groups
an exact selection would have to open, for G = 4, 8, 16, 32. Near 1, the index saves nothing.

    PYTHONPATH=src python benchmarks/recall_group_bound.py --fill 20000
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--fill", type=int, default=20000)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--recall", default="8x32", help="KxB: recalled blocks and block size")
    p.add_argument("--decode", type=int, default=8, help="greedy tokens after the question")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from streaming_llm.core import recall
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.eval.data import load_corpus, tokenize_corpus
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    torch.set_num_threads(args.threads)
    k, b = (int(x) for x in args.recall.split("x"))
    model, tok = load_model(args.model)
    model = quantize_linears(model, "auto")
    e = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=args.window, recall_blocks=k, block_size=b))
    ids, _ = tokenize_corpus(load_corpus(), tok)
    e.feed(torch.as_tensor(ids[: args.fill]).long(), logits="none")
    choices = []  # (memory, query, pos_shift) of every layer's choice on the forwards below
    real = recall.choose

    def spy(layer, query):
        choices.append((layer.memory, query.detach().clone(), layer.owner.pos_shift[0]))
        return real(layer, query)

    recall.choose = spy
    try:
        question = tok(" What is the main topic of the text above? The answer is", return_tensors="pt").input_ids[0]
        out = e.feed(question, logits="last")  # (V,)
        for _ in range(args.decode):
            out = e.feed(torch.tensor([int(out.argmax())]), logits="last")
    finally:
        recall.choose = real
    groups = (4, 8, 16, 32)
    opened = {g: [] for g in groups}
    for mem, q, shift in choices:
        s = mem.scores(q, shift)  # (n,) the engine's own block scores
        summary = mem.summary()  # by slot: the memory has not wrapped at these fills
        mx, mn = summary["maxs"], summary["mins"]
        hkv, d = mx.shape[1:]
        qq = q[0].float()
        if shift:
            qq = qq @ mem._to_stream_frame(shift, qq.dtype, qq.device)
        qq = qq.reshape(hkv, -1, d)
        pos = qq.clamp(min=0).sum(1)
        kth = torch.topk(s, k).values[-1]
        for g in groups:
            m = s.numel() // g * g
            gmax = mx[:m].reshape(-1, g, hkv, d).amax(1)
            gmin = mn[:m].reshape(-1, g, hkv, d).amin(1)
            bound = gmax.flatten(1) @ pos.flatten() + gmin.flatten(1) @ (qq.sum(1) - pos).flatten()
            opened[g].append((bound >= kth).float().mean().item())
    print(f"{args.model}, {args.fill} tokens streamed, {mem.stored} blocks of {b} held per layer, K={k}; "
          f"{len(choices)} layer choices (the question's forward and {args.decode} decoded tokens)")
    for g in groups:
        v = torch.tensor(opened[g])
        print(f"groups of {g:>2} blocks: fraction an exact selection must open: mean {v.mean():.3f}  "
              f"median {v.median():.3f}  max {v.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
