"""Pre-training small Llama-style models with and without a dedicated attention sink (issue 5).

- `tokenizer`: a byte-level BPE tokenizer trained on the corpus, with a `<sink>` vocabulary entry.
- `model`: model sizes, the three variants, the softmax-off-by-one attention function.
- `loop`: the training loop with checkpoint/resume; identical data order for every variant.
- `evaluate`: validation loss, streaming perplexity by number of sinks, attention share on position 0.
- `pretrain`: the `streaming-llm pretrain` verb and its result files (JSON, markdown, PNG).

Nothing here is imported by the engine; the engine streams the saved models like any other.
"""
