"""The training loop: identical data order for every variant, checkpoints, automatic resume.

A sample is `context + 1` consecutive training tokens at a random offset; the model reads the
first `context` and predicts the last `context`. The sink-token variant reads `<sink>` first, so
its inputs are one position longer, and the prediction made at the sink is not scored: every
variant is scored on exactly the same targets given the same text. Offsets for step s come from
`numpy.random.default_rng([seed, s])`, so the data order does not depend on the variant and a
resumed run sees the batches it would have seen.

Checkpoints (model, optimizer, step, loss history) are written atomically every
`checkpoint_every_s` seconds, at the end, and on Ctrl-C; `train_variant` resumes from one when the
settings match. It does NOT evaluate or write result tables (see `evaluate`, `pretrain`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

CHECKPOINT = "checkpoint.pt"
TRAIN_SUMMARY = "train.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # 0: 5% of steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
        warm = self.warmup_steps or max(1, self.steps // 20)
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, self.steps - warm)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sample_offsets(n_tokens: int, context: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    high = n_tokens - (context + 1)
    if high < 0:
        raise UserError(f"training text has {n_tokens} tokens, fewer than one sample of {context + 1}")
    return np.random.default_rng([seed, step]).integers(0, high + 1, size=batch_size)


def make_batch(ids: np.ndarray, offsets: np.ndarray, context: int, sink_id: int | None = None):
    """(inputs, targets) as int64 tensors: inputs (B, context [+1 with sink]), targets (B, context)."""
    import torch

    rows = np.stack([ids[o : o + context + 1] for o in offsets]).astype(np.int64)  # (B, context+1)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if sink_id is not None:
        inputs = np.concatenate([np.full((len(rows), 1), sink_id, dtype=np.int64), inputs], axis=1)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(targets))


def lm_loss(model, inputs, targets):
    """Mean next-token cross entropy on the last `targets.shape[1]` positions."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs, use_cache=False).logits[:, -targets.shape[1] :]  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_variant(
    model,
    train_ids: np.ndarray,
    context: int,
    settings: TrainSettings,
    out_dir: Path,
    sink_id: int | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Train `model` in place (resuming from out_dir/checkpoint.pt); returns the training summary."""
    import torch
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    state = {"step": 0, "losses": [], "seconds": 0.0}
    ident = {"settings": settings.to_dict(), "context": context, "sink_id": sink_id, "n_train_tokens": int(len(train_ids))}
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["ident"] != ident:
            raise UserError(
                f"{ckpt_path} was made with other settings ({ckpt['ident']}, now {ident}); "
                "use another --out folder or delete it to start over"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]

    def save() -> None:
        _save_atomic({"ident": ident, "model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt_path)

    tokens_per_step = settings.batch_size * context
    model.train()
    bar = tqdm(total=settings.steps, initial=state["step"], desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    last_save = time.perf_counter()
    try:
        while state["step"] < settings.steps:
            step = state["step"]
            t0 = time.perf_counter()
            offsets = sample_offsets(len(train_ids), context, settings.batch_size, settings.seed, step)
            inputs, targets = make_batch(train_ids, offsets, context, sink_id)
            for group in opt.param_groups:
                group["lr"] = settings.lr_at(step)
            loss = lm_loss(model, inputs, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["seconds"] += dt
            state["losses"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if time.perf_counter() - last_save > checkpoint_every_s:
                save()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        save()  # Ctrl-C: keep what was done; the next run resumes here
        raise
    finally:
        bar.close()
    save()
    model.eval()
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10) :]  # last 10% of steps, smoothed
    return {
        "steps": state["step"],
        "tokens": state["step"] * tokens_per_step,
        "train_seconds": round(state["seconds"], 1),
        "tokens_per_s": round(state["step"] * tokens_per_step / max(state["seconds"], 1e-9), 1),
        "train_loss": float(np.mean(tail)),
        "first_loss": losses[0] if losses else None,
        "loss_curve": _curve(losses),
    }


def _curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """[step, mean loss] over up to `points` equal stretches of the run (for the plot)."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def write_summary(out_dir: Path, summary: dict) -> None:
    tmp = out_dir / (TRAIN_SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / TRAIN_SUMMARY)
