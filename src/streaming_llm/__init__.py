"""streaming-llm: attention-sink streaming (StreamingLLM, Xiao et al., ICLR 2024) for transformers 5.x."""

__version__ = "0.1.0"
