"""streaming-llm: attention-sink streaming (StreamingLLM, Xiao et al., ICLR 2024) for transformers 5.x.

    from streaming_llm import StreamingLLM
    engine = StreamingLLM.from_pretrained("smollm2-135m-instruct", sinks=4, window=1020)

Public names are imported lazily so that `streaming-llm --help` does not load torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "StreamingLLM": "streaming_llm.core.engine",
    "Token": "streaming_llm.core.engine",
    "StreamingConfig": "streaming_llm.core.config",
    "StreamingCache": "streaming_llm.core.cache",
    "StreamBatch": "streaming_llm.core.batch",
    "SamplingParams": "streaming_llm.core.sampling",
    "ChatSession": "streaming_llm.chat.session",
    "load_model": "streaming_llm.models.loading",
    "enable_streaming_attention": "streaming_llm.core.attention",
    "UserError": "streaming_llm.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streaming_llm' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, "enable" if name == "enable_streaming_attention" else name)
