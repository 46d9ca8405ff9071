"""SmolLM2: the BOS rule gives no BOS, so the stream ids are exactly the BOS-free ones; gutenberg-kjv starts with gutenberg."""
import hashlib
import numpy as np
from streaming_llm.eval.data import load_corpus, tokenize_corpus, load_tokenizer
from streaming_llm.models.loading import load_model
from streaming_llm.models import special_tokens as st
_, tok = load_model("smollm2-135m-instruct")
print("smollm2 wants_bos:", st.wants_bos(tok), "|", st.bos_source(tok))
g = load_corpus("gutenberg")
rule, _ = tokenize_corpus(g, tok)               # the model's rule (what every command now streams)
off, _ = tokenize_corpus(g, tok, bos=False)     # no BOS: what the project streamed before
print("gutenberg tokens:", rule.size, "identical to the BOS-free ids:", np.array_equal(rule, off),
      "sha256[:16]:", hashlib.sha256(rule.astype(np.int64).tobytes()).hexdigest()[:16])
k, books = tokenize_corpus(load_corpus("gutenberg-kjv"), tok)
print("gutenberg-kjv tokens:", k.size, "books:", len(books), "first", rule.size, "ids equal gutenberg's:", np.array_equal(k[: rule.size], rule))
print("kjv starts at token", dict(books)["Genesis (KJV)"])
