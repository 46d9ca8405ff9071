"""What a durable put costs in the server's `SQLiteStore`: the page size and the WAL checkpoint.

For each snapshot size (5 and 20 MB: what a served turn of smollm2 stores while its cache fills;
47.3 MB: a full float32 4+1020 snapshot) and each page size (SQLite's default 4 KiB, and the
store's `PAGE_SIZE`), `PUTS` puts of a random blob into a new database, with the checkpoint and
truncation after each write (the server's behaviour) and, for the store's page size, without it.
Prints put p50 / max and the files' sizes; the modes of one size alternate within the run.

    PYTHONPATH=src python benchmarks/store_wal.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from streaming_llm.server import store as store_mod
from streaming_llm.server.store import SessionRecord, SQLiteStore

SIZES = (5_000_000, 20_000_000, 47_300_000)
PUTS = 10


def run(blob: bytes, page_size: int, checkpoint: bool) -> str:
    d = Path(tempfile.mkdtemp(prefix="store-wal-"))
    default = store_mod.PAGE_SIZE
    try:
        store_mod.PAGE_SIZE = page_size
        store = SQLiteStore(d / "s.sqlite3")
        if not checkpoint:
            store._checkpoint = lambda: None
        times = []
        for turn in range(PUTS):
            record = SessionRecord("s", "chat", "m", {}, [{"role": "user", "content": "x" * 1000}] * turn, blob, turn)
            t0 = time.perf_counter()
            store.put(record)
            times.append(1000 * (time.perf_counter() - t0))
        wal = d / "s.sqlite3-wal"
        wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
        got = store._db.execute("PRAGMA page_size").fetchone()[0]
        store._db.close()
        mode = "checkpoint+truncate" if checkpoint else "no checkpoint"
        return (f"{len(blob) / 1e6:5.1f} MB, page {got:5d}, {mode:19s}: put p50 {statistics.median(times):6.1f} ms "
                f"max {max(times):6.1f} ms; db {(d / 's.sqlite3').stat().st_size / 1e6:.1f} MB, wal {wal_mb:.1f} MB")
    finally:
        store_mod.PAGE_SIZE = default
        shutil.rmtree(d)


def main() -> None:
    print(f"{PUTS} puts each; the store's page size is {store_mod.PAGE_SIZE}")
    for size in SIZES:
        blob = os.urandom(size)
        for page_size, checkpoint in ((4096, True), (store_mod.PAGE_SIZE, True), (store_mod.PAGE_SIZE, False)):
            print(run(blob, page_size, checkpoint), flush=True)


if __name__ == "__main__":
    main()
