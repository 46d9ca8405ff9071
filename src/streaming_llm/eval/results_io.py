"""Result files of the evaluations: a JSON document and a CSV table, written the one way.

`write_json(out_dir, name, obj)` writes `<out_dir>/<name>` (indented, one trailing newline),
creating the folder; `write_csv(path, header, rows)` writes a header line and the rows. Used by
`experiments` (the perplexity reproductions) and the retrieval evaluations (`passkey`,
`streameval`). It does NOT decide what goes into the files, nor read them (plots do).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_json(out: Path, name: str, obj) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(obj, indent=1) + "\n")


def write_csv(path: Path, header: list[str], rows) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
