"""Command-line flags shared by the verbs that load a model (chat, serve, ppl, bench, ...).

`add_load_arguments` adds where the model comes from and how its weights are held (--model,
--dtype, --device, --quant); `add_streaming_arguments` adds the cache settings (--method, --sinks,
--window, --positions, --chunk-size and the recall flags, which `add_recall_arguments` adds on their
own for verbs with cache flags of their own, such as bench; --recall-select and --recall-score
are added by `add_streaming_arguments` only); `add_model_arguments` adds both. `load_model_from_args` and
`config_from_args` turn the parsed flags into a (model, tokenizer) pair and a `StreamingConfig`.
It holds no verb logic: each verb owns the rest of its command line.
"""

from __future__ import annotations

from .models import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPE_CHOICES, QUANT_CHOICES
from .errors import UserError


def add_load_arguments(p, quant_default: str = "none") -> None:
    """--model, --dtype, --device, --quant."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, .gguf file or hub id")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", default=quant_default, choices=QUANT_CHOICES,
                   help="weight format of the linear layers for CPU decoding speed; auto: int4 when the weights are "
                   "already 4-bit (Q4 GGUF models), else none, chosen by a cached per-machine calibration that "
                   "also picks from how many rows a bfloat16 copy takes over; bf16: bfloat16 weights (AMX "
                   "through oneDNN where the CPU has it); with a quantized format the KV cache is bfloat16 "
                   "(default: %(default)s)")


def add_streaming_arguments(p) -> None:
    """--method, --sinks, --window, --positions, --chunk-size, and the recall flags."""
    from .core.config import DEFAULT_CHUNK, DEFAULT_SINKS, DEFAULT_WINDOW, METHODS, POSITIONS

    p.add_argument("--method", default="streaming", choices=METHODS)
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="attention sinks kept (0 for --method window)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="most recent tokens kept")
    p.add_argument("--positions", default="cache", choices=POSITIONS, help="cache: the paper; absolute: ablation")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="tokens per forward when feeding")
    add_recall_arguments(p)
    add_recall_select_argument(p)


def add_recall_select_argument(p) -> None:
    """--recall-select and --recall-score (with the recall flags of `add_streaming_arguments`; not
    in `add_recall_arguments`, which bench also takes: bench does not pass them through, so it
    refuses the flags rather than ignore them)."""
    from .core.config import RECALL_SCORES, RECALL_SELECTS

    p.add_argument("--recall-select", default="layer", choices=RECALL_SELECTS,
                   help="how a layer chooses its recalled blocks: layer (one choice shared by all heads) or head "
                   "(each KV head its own, by the bound of its own query heads; default: %(default)s)")
    p.add_argument("--recall-score", default="bound", choices=RECALL_SCORES,
                   help="how a block is scored against the queries: bound (Quest's upper bound from per-channel key "
                   "minima and maxima), mean (q . the block's mean key, half the summary RAM; alone it answered "
                   "fewer pass keys than bound on both offline models) or both (the bound's best block, the mean "
                   "key's best, the bound's second, ...; 1.5x the bound's summary RAM; with 16 blocks it meets the "
                   "pass-key target on both offline models, docs/recall_evals.md; default: %(default)s)")


def add_recall_arguments(p) -> None:
    """--recall-blocks, --block-size, --recall-memory-tokens, --recall-dtype, --recall-every (also on their own, for
    verbs such as bench that own their cache-size flags)."""
    from .core.config import DEFAULT_BLOCK_SIZE, DEFAULT_RECALL_MEMORY_TOKENS, RECALL_DTYPES

    p.add_argument("--recall-blocks", type=int, default=0,
                   help="recall of evicted tokens: blocks of evicted tokens each layer brings back per forward, "
                   "between the sinks and the window (0: off, plain streaming; needs --method streaming)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="evicted tokens per recall block (default: %(default)s)")
    p.add_argument("--recall-memory-tokens", type=int, default=DEFAULT_RECALL_MEMORY_TOKENS,
                   help="most evicted tokens the recall memory keeps (on disk; oldest blocks dropped beyond it; "
                   "default: %(default)s)")
    p.add_argument("--recall-dtype", default="float32", choices=RECALL_DTYPES,
                   help="how the recall memory stores the blocks' keys and values (default: %(default)s)")
    p.add_argument("--recall-every", type=int, default=1,
                   help="decode steps one choice of recalled blocks lasts (1: every step chooses; chunks always "
                   "choose; default: %(default)s)")


def add_model_arguments(p, quant_default: str = "none") -> None:
    """Flags shared by every verb that loads a model and streams through it."""
    add_load_arguments(p, quant_default)
    add_streaming_arguments(p)


def load_model_from_args(args):
    """(model, tokenizer) as the shared model flags say, quantized if asked. The thread policy
    (`models.threads`: `args.threads` if the verb has it, else auto) is applied first."""
    from .models.threads import apply as apply_threads

    apply_threads(getattr(args, "threads", None))  # before torch loads, where it has not yet
    from .models.loading import load_model
    from .models.quantize import quantize_linears

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    quant = getattr(args, "quant", "none")
    if quant == "auto" and (args.device != "cpu" or args.dtype != "float32"):  # the int kernels take float32 in
        quant = "none"
    if quant != "none":
        if args.device != "cpu" or args.dtype != "float32":
            raise UserError("--quant needs --device cpu and --dtype float32")
        quantize_linears(model, quant)
    return model, tokenizer


def config_from_args(args):
    """The `StreamingConfig` the streaming flags describe."""
    from .core.config import DEFAULT_BLOCK_SIZE, DEFAULT_RECALL_MEMORY_TOKENS, StreamingConfig

    return StreamingConfig(
        method=args.method, sinks=args.sinks, window=args.window, positions=args.positions, chunk_size=args.chunk_size,
        recall_blocks=getattr(args, "recall_blocks", 0),
        block_size=getattr(args, "block_size", DEFAULT_BLOCK_SIZE),
        recall_memory_tokens=getattr(args, "recall_memory_tokens", DEFAULT_RECALL_MEMORY_TOKENS),
        recall_dtype=getattr(args, "recall_dtype", "float32"),
        recall_select=getattr(args, "recall_select", "layer"),
        recall_every=getattr(args, "recall_every", 1),
        recall_score=getattr(args, "recall_score", "bound"),
    )
