"""What the retrieval evaluations (`reproduce passkey`, `reproduce streameval`) share.

- `Method` / `method_list`: the methods compared, each a label plus the `StreamingConfig` it runs:
  `dense` (the ceiling), `window 0+C` (plain sliding window, no sinks), `streaming 4+W` and
  `streaming 4+W + recall KxB` (the engine's recall of evicted tokens, `core/recall.py`).
- `engine_for`: one engine per method over an already loaded model (reset between prompts).
- `greedy`: a greedy answer (temperature 0, no repetition penalty) to a question fed as its own
  forward, stopped by a text rule.
- `first_match` / `exact_match`: the answer parsed from a reply, compared exactly.
- `accuracy`, `target`: the aggregation and the issue's target rule (where the answer has been
  evicted and dense still answers, recall reaches 80% of dense while plain streaming is near 0).
- `load` / `results_dir`: the model (thread policy first) and where a model's results go.

It does NOT build prompts (`passkey.py`, `streameval.py`), implement attention or recall (core),
or draw (`recall_plots.py`, which reads the result files only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.config import DEFAULT_SINKS, StreamingConfig
from ..core.sampling import SamplingParams
from ..errors import UserError
from ..models import DEFAULT_MODEL

# results of another model go to <out>/<name><suffix>/ (the default model's to <out>/<name>/)
DIR_SUFFIX = {DEFAULT_MODEL: "", "gemma3-270m": "_gemma3"}
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
CHUNK = 512  # tokens per forward while feeding the text (the question is always its own forward)
# the target rule (issue 15): a cell counts where the answer is outside the window and dense
# answers at least DENSE_ANSWERS of it; there recall must reach RATIO x dense, streaming <= NEAR_ZERO
DENSE_ANSWERS, RATIO, NEAR_ZERO = 0.5, 0.8, 0.1
SCORE_LETTERS = {"bound": "", "mean": "m", "both": "b"}  # a recall spec's letter for `--recall-score`
LETTER_SCORES = {letter: score for score, letter in SCORE_LETTERS.items() if letter}


@dataclass(frozen=True)
class Method:
    """One compared method. `window` is W of the 4+W cache (None for dense); a `window` method has
    the same total cache, 0+(4+W); `recall` is (blocks, block size) on top of 4+W, or (blocks,
    block size, "head") for per-KV-head selection (label `KxBh`), or (blocks, block size, select,
    N) for a choice that lasts N decode steps (label `KxBeN`, `KxBheN`), or (blocks, block size,
    select, N, "mean") for blocks scored by their mean key (label `KxBm`, `KxBmeN`), or by the bound
    and the mean key in turn (`"both"`, label `KxBb`, `KxBbeN`)."""

    kind: str  # dense | window | streaming | recall
    window: int | None = None
    recall: tuple | None = None
    sinks: int = DEFAULT_SINKS

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "window":
            return f"window 0+{self.window + self.sinks}"
        base = f"streaming {self.sinks}+{self.window}"
        if self.recall is None:
            return base
        return (f"{base} + recall {self.recall[0]}x{self.recall[1]}" + ("h" if self.select == "head" else "")
                + SCORE_LETTERS[self.score] + (f"e{self.every}" if self.every > 1 else ""))

    @property
    def select(self) -> str:
        """How the recall method chooses its blocks: `layer` or `head` (`StreamingConfig.recall_select`)."""
        return self.recall[2] if self.recall is not None and len(self.recall) > 2 else "layer"

    @property
    def every(self) -> int:
        """Decode steps one choice of blocks lasts (`StreamingConfig.recall_every`)."""
        return self.recall[3] if self.recall is not None and len(self.recall) > 3 else 1

    @property
    def score(self) -> str:
        """How the recall method scores blocks: `bound`, `mean` or `both` (`StreamingConfig.recall_score`)."""
        return self.recall[4] if self.recall is not None and len(self.recall) > 4 else "bound"

    @property
    def cache(self) -> str:
        """The cache the method is compared at ("" for dense): '4+W'."""
        return "" if self.window is None else f"{self.sinks}+{self.window}"

    def config(self, chunk: int = CHUNK) -> StreamingConfig:
        if self.kind == "dense":
            return StreamingConfig(method="dense", chunk_size=chunk)
        if self.kind == "window":
            return StreamingConfig(method="window", sinks=0, window=self.window + self.sinks, chunk_size=chunk)
        k, b = self.recall[:2] if self.recall else (0, StreamingConfig.block_size)
        return StreamingConfig(sinks=self.sinks, window=self.window, recall_blocks=k, block_size=b, chunk_size=chunk,
                               recall_select=self.select, recall_every=self.every, recall_score=self.score)

    def in_window(self, distance: int) -> bool:
        """Whether a token `distance` tokens before the next one (1: the last token fed) is still in
        the window (dense: always; sinks and recalled blocks aside)."""
        return self.window is None or distance <= (self.window + self.sinks if self.kind == "window" else self.window)


def parse_recall(spec: str) -> tuple:
    """'4x32' -> (4, 32): K recalled blocks of B tokens, one choice per layer; '4x32h' ->
    (4, 32, "head"): the same, each KV head choosing its own blocks; '4x32e4' -> (4, 32, "layer",
    4), '4x32he4' -> (4, 32, "head", 4): a choice lasts 4 decode steps; '4x32m' / '4x32me4' ->
    (4, 32, "layer", 1 / 4, "mean"): blocks scored by their mean key (`--recall-score mean`);
    '16x32be4' -> (16, 32, "layer", 4, "both"): by the bound and the mean key in turn."""
    letters = "".join(LETTER_SCORES)
    m = re.fullmatch(rf"\s*(\d+)\s*[xX]\s*(\d+)\s*([hH]?)\s*([{letters}{letters.upper()}]?)\s*(?:[eE](\d+))?\s*", spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1 or (m.group(5) is not None and int(m.group(5)) < 1):
        raise UserError(f"--recall takes KxB specs such as 4x32 (blocks x block size; 4x32h: per-head "
                        f"selection; 4x32m: blocks scored by their mean key; 4x32b: by the bound and the mean key "
                        f"in turn; 4x32e4: a choice lasts 4 decode "
                        f"steps), got {spec!r}")
    k, b, select = int(m.group(1)), int(m.group(2)), "head" if m.group(3) else "layer"
    every = int(m.group(5)) if m.group(5) is not None else 1
    if m.group(4):
        return k, b, select, every, LETTER_SCORES[m.group(4).lower()]
    if every > 1:
        return k, b, select, every
    return (k, b) + (("head",) if m.group(3) else ())


def recall_list(s: str) -> list[tuple[int, int]]:
    """'4x32,8x16,4x32h' -> [(4, 32), (8, 16), (4, 32, "head")] ('' or 'none': no recall methods)."""
    if s.strip().lower() in ("", "none"):
        return []
    return [parse_recall(x) for x in s.split(",") if x.strip()]


def method_list(windows: list[int], recalls: list[tuple[int, int]], with_window: bool = False) -> list[Method]:
    """dense, then per window: [window 0+(4+W)], streaming 4+W, streaming 4+W + recall KxB for each spec."""
    if not windows or any(w < 1 for w in windows):
        raise UserError(f"--windows must be a list of integers >= 1 (got {windows})")
    out = [Method("dense")]
    for w in windows:
        if with_window:
            out.append(Method("window", w))
        out.append(Method("streaming", w))
        out += [Method("recall", w, r) for r in recalls]
    return out


def results_dir(out: str | Path, name: str, model: str) -> Path:
    """<out>/<name>/ for the default model, <out>/<name>_gemma3/ for gemma3-270m, else a suffix
    made from the model's name."""
    suffix = DIR_SUFFIX.get(model)
    if suffix is None:
        suffix = "_" + (re.sub(r"[^\w.-]+", "_", Path(model).stem or model).strip("_") or "model")
    return Path(out) / f"{name}{suffix}"


def load(model_name: str):
    """(model, tokenizer) of a model name, after the thread policy (`$STREAMING_LLM_THREADS`)."""
    from ..models.threads import apply as apply_threads

    apply_threads(None)
    from ..models.loading import load_model

    return load_model(model_name)


def engine_for(model, tokenizer, method: Method, chunk: int = CHUNK):
    from ..core.engine import StreamingLLM

    return StreamingLLM(model, tokenizer, method.config(chunk))


def greedy(engine, question_ids: list[int], max_new_tokens: int, stop: Callable[[str], bool]) -> str:
    """Feed the question as one forward (so recall selects blocks on the question's queries), then
    decode greedily until `stop(text so far)` or `max_new_tokens`. Every yielded token is already
    in the stream, so the stream holds exactly the returned answer."""
    text = ""
    for tok in engine.generate(question_ids, max_new_tokens, GREEDY):
        text += tok.text
        if tok.finish_reason is None and stop(text):
            break
    return text


def first_match(reply: str, pattern: str) -> str | None:
    """The first substring of `reply` that matches `pattern` (its group 1 if it has one)."""
    m = re.search(pattern, reply)
    if m is None:
        return None
    return m.group(1) if m.groups() else m.group(0)


def exact_match(reply: str, pattern: str, answer: str, ignore_case: bool = False) -> tuple[str | None, bool]:
    """(parsed answer, whether it equals `answer` exactly)."""
    got = first_match(reply, pattern)
    if got is None:
        return None, False
    return got, (got.lower() == answer.lower() if ignore_case else got == answer)


def accuracy(flags) -> float | None:
    flags = [bool(x) for x in flags]
    return round(sum(flags) / len(flags), 4) if flags else None


def target(dense: float | None, streaming: float | None, recall: float | None, evicted: bool) -> dict:
    """The issue's target for one cell: counts where the answer was evicted and dense answers."""
    counts = bool(evicted and dense is not None and dense >= DENSE_ANSWERS)
    res = {"counts": counts, "met": None}
    if counts and streaming is not None and recall is not None:
        res["recall_over_dense"] = round(recall / dense, 3)
        res["met"] = bool(recall >= RATIO * dense and streaming <= NEAR_ZERO)
    return res


def target_rule() -> str:
    return (f"cells where the answer lies outside the window and dense scores >= {DENSE_ANSWERS}: "
            f"met when recall >= {RATIO} x dense and streaming <= {NEAR_ZERO}")


def progress_bar(total: int, desc: str, enabled: bool = True):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True, disable=not enabled)
