"""What bounding the SQLite WAL costs: 10 puts of one full smollm2 snapshot (47.3 MB, float32,
4+1020 window) into the server's `SQLiteStore`, with the checkpoint+truncate after each write
(the server's behaviour) and without it (before). Prints put time and the files' sizes.

    PYTHONPATH=src python benchmarks/store_wal.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from streaming_llm.server.store import SessionRecord, SQLiteStore

SNAPSHOT_BYTES = 47_300_000
PUTS = 10


def main() -> None:
    blob = os.urandom(SNAPSHOT_BYTES)
    for mode in ("checkpoint+truncate", "no checkpoint (before)"):
        d = Path(tempfile.mkdtemp(prefix="store-wal-"))
        try:
            store = SQLiteStore(d / "s.sqlite3")
            if mode.startswith("no"):
                store._checkpoint = lambda: None
            times = []
            for turn in range(PUTS):
                record = SessionRecord("s", "chat", "m", {}, [{"role": "user", "content": "x" * 1000}] * turn, blob, turn)
                t0 = time.perf_counter()
                store.put(record)
                times.append(1000 * (time.perf_counter() - t0))
            wal = d / "s.sqlite3-wal"
            wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
            print(f"{mode}: {PUTS} puts of {SNAPSHOT_BYTES / 1e6:.1f} MB, put p50 {sorted(times)[PUTS // 2]:.0f} ms "
                  f"max {max(times):.0f} ms; db {(d / 's.sqlite3').stat().st_size / 1e6:.1f} MB, wal {wal_mb:.1f} MB")
            store._db.close()
        finally:
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
