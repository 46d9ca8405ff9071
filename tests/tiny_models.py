"""Tiny random-initialised models of every supported architecture (no weights, seconds each)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, max_position_embeddings=4096)


def _config(arch: str):
    if arch == "llama":
        return tf.LlamaConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **COMMON, intermediate_size=96, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
            sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if arch == "phi3":
        return tf.Phi3Config(
            **COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            pad_token_id=0,
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, rotary_pct=0.25)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox"]


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = _config(arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = tf.AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform attention; sharpen it so sink/window choices matter in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "query_key_value", "qkv_proj")) and p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte (ids 0..95 wrap printable ASCII), no specials."""

    eos_token_id = 10  # newline

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % 96 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(32 + (i % 96) for i in ids).decode("latin-1")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (no merges) with ChatML specials, as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def save_tiny_model(path, arch: str = "llama", seed: int = 0):
    """A random tiny model + byte-level tokenizer saved like any transformers model folder."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
