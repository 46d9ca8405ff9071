"""A byte-level BPE tokenizer trained on the corpus with the `tokenizers` library.

Small vocabularies keep the embedding from being most of a few-million-parameter model. The
vocabulary always holds `<|endoftext|>` (id 0, bos/eos) and `<sink>` (id 1, the learnable attention
sink of the sink-token variant), so every variant has the same vocabulary and the same initial
weights. Encoding adds no special tokens. Saved as a standard `PreTrainedTokenizerFast` folder.

It does NOT tokenize the corpus (that is `streaming_llm.eval.data.tokenize_corpus`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOT_TOKEN = "<|endoftext|>"
SINK_TOKEN = "<sink>"
SPECIAL_TOKENS = (EOT_TOKEN, SINK_TOKEN)
_CHUNK_CHARS = 100_000  # pieces fed to the trainer (pre-tokenization splits on whitespace anyway)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train byte-level BPE on texts; returns a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer)
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        extra_special_tokens={"sink_token": SINK_TOKEN},
    )


def _chunks(texts: Iterable[str]):
    for text in texts:
        for i in range(0, len(text), _CHUNK_CHARS):
            yield text[i : i + _CHUNK_CHARS]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def sink_token_id(tokenizer) -> int:
    return int(tokenizer.convert_tokens_to_ids(SINK_TOKEN))
