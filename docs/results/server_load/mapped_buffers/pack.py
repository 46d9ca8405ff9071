"""Scratch: pack_state (a full snapshot) of a 200-token stream of the default model, 6 times in one process
(the first: the new session's first turn); argv[1] memset|mmap picks how the cache buffers were allocated.
Prints the blob size and (wall ms, CPU ms) of each pack."""
import sys, time, torch, statistics
sys.path.insert(0, "src")
from streaming_llm.core import cache as C
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears
from streaming_llm.server.conversations import pack_state
from streaming_llm.models import threads
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m-instruct"); model = quantize_linears(model, "auto")
config = StreamingConfig(sinks=4, window=1020)
if sys.argv[1] == "memset": C.MAPPED_BYTES = 1 << 62
e = StreamingLLM(model, tok, config)
e.feed(torch.randint(0, 49152, (200,)), logits="none")
threads.single_threaded()
st = e.state_dict() if False else None
ts = []
for i in range(6):
    c0 = time.process_time(); t0 = time.perf_counter()
    blob = pack_state(e.state_dict(copy=False))
    ts.append((round(1000*(time.perf_counter()-t0),1), round(1000*(time.process_time()-c0),1)))
print(sys.argv[1], len(blob), ts)
