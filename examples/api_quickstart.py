"""The README's API example, runnable: `python examples/api_quickstart.py`."""

from streaming_llm import SamplingParams, StreamBatch, StreamingCache, StreamingLLM

# 1. An engine: the default offline model, 4 attention sinks + a 1020-token window.
engine = StreamingLLM.from_pretrained("smollm2-135m-instruct", sinks=4, window=1020)
tok = engine.tokenizer

# 2. Feed any amount of text: logits for every token, constant memory however long the stream.
ids = tok("The attention sink keeps the first tokens. " * 200, add_special_tokens=False)["input_ids"]
logits = engine.feed(ids)  # (len(ids), vocab), float32, chunked with exact streaming semantics
print(f"fed {engine.tokens_seen} tokens; cache holds {engine.cache_tokens}/{engine.capacity}, evicted {engine.evicted}")

# 3. Generate: tokens stream out one by one (each is fed back before it is yielded).
prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
for t in engine.generate(prompt, max_new_tokens=40, sampling=SamplingParams(temperature=0), stop_ids=[tok.eos_token_id]):
    print(t.text, end="", flush=True)
print()

# 4. The streaming cache with plain transformers `generate` (the model is already switched to the
#    streaming attention by the engine; `streaming_llm.enable_streaming_attention(model)` does that).
cache = engine.new_cache()
out = engine.model.generate(tok("Once upon a time", return_tensors="pt")["input_ids"], cache=cache,
                            max_new_tokens=20, do_sample=False)
assert isinstance(cache, StreamingCache)
print(tok.decode(out[0]), f"[cache: {cache.cache_tokens} tokens]")

# 5. Many streams in one forward, each exactly as if alone: rows join and leave between forwards.
batch = StreamBatch(engine, slots=4)
a, b = batch.add(), batch.add(engine.state_dict())  # a new stream, and the engine's stream moved in
both = batch.feed([a, b], [tok("Hello", add_special_tokens=False)["input_ids"][:1]] * 2)  # (2, vocab)
print(f"batch: rows {a}, {b} hold {batch.tokens_seen(a)} and {batch.tokens_seen(b)} tokens; next ids {both.argmax(-1).tolist()}")
# rows fed different numbers of tokens in one forward: a decoded token beside a prompt's chunk
nxt, chunk = batch.feed_mixed([([b], both[1:].argmax(-1, keepdim=True), "last"),
                               ([a], tok(" world, how are you", return_tensors="pt")["input_ids"], "last")])
print(f"mixed: row {b} decoded 1 token, row {a} took a chunk; rows now hold {batch.tokens_seen(a)} and {batch.tokens_seen(b)}")
batch.remove(a)
