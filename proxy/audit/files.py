"""Audit files on disk: monthly path templates, reading .jsonl and .jsonl.gz, compression.

Shared by the writer (where does the chain continue after a restart, which
finished months to compress) and by ``pgwarden audit`` (which files, in what
order). A path with ``%Y`` and ``%m`` is a monthly template: the events of
each UTC month go to their own file, and finished months are gzipped.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

TAIL_CHUNK = 1 << 16


def is_template(path: str) -> bool:
    return "%Y" in path or "%m" in path


def expand(template: str, t: float) -> str:
    """The file of the month containing epoch time ``t`` (UTC)."""
    if not is_template(template):
        return template
    d = datetime.fromtimestamp(t, timezone.utc)
    return template.replace("%Y", f"{d.year:04d}").replace("%m", f"{d.month:02d}")


def next_month_start(t: float) -> float:
    """Epoch seconds of the first instant of the UTC month after the one containing ``t``."""
    d = datetime.fromtimestamp(t, timezone.utc)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return datetime(y, m, 1, tzinfo=timezone.utc).timestamp()


def template_files(template: str) -> list[str]:
    """Existing files of a monthly template (plain and gzipped), oldest month first."""
    pattern = template.replace("%Y", "[0-9]" * 4).replace("%m", "[0-9]" * 2)
    found = set(glob.glob(pattern)) | set(glob.glob(pattern + ".gz"))
    return sorted(found, key=lambda p: (p.removesuffix(".gz"), p.endswith(".gz")))


def read_lines(path: str) -> Iterator[bytes]:
    """Lines of a .jsonl or .jsonl.gz file, without their newline (a torn last line included)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line in f:
            yield line[:-1] if line.endswith(b"\n") else line


def lines_backwards(path: str) -> Iterator[bytes]:
    """Lines from the last to the first, reading a plain file from its end in chunks."""
    if path.endswith(".gz"):
        yield from reversed(list(read_lines(path)))
        return
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        first = True
        while pos > 0:
            step = min(TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + rest
            parts = chunk.split(b"\n")
            rest = parts[0]
            tail = parts[1:]
            if first:
                first = False
                if tail and tail[-1] == b"":
                    tail.pop()  # the file ends with a newline
            yield from reversed(tail)
        if not first:
            yield rest  # the first line of the file


def ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def compress(path: str) -> str:
    """gzip a finished file next to itself (atomically: .tmp, fsync, rename), then remove it."""
    dest = path + ".gz"
    tmp = dest + ".tmp"
    with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    os.unlink(path)
    return dest


def expand_inputs(paths: list[str]) -> list[str]:
    """Files named on the command line; a directory stands for its .jsonl/.log files (gzipped too)."""
    out: list[str] = []
    for p in paths:
        if Path(p).is_dir():
            for name in sorted(os.listdir(p)):
                if name.endswith((".jsonl", ".jsonl.gz", ".log", ".log.gz")):
                    out.append(str(Path(p) / name))
        else:
            out.append(p)
    return out


def first_time(path: str) -> str:
    """The ``time`` of a file's first event, or "" (how files are put in order)."""
    import orjson

    for raw in read_lines(path):
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("time"), str):
            return ev["time"]
    return ""


def in_order(paths: list[str]) -> list[str]:
    """Files in the order their events were written: by first event time, then by name."""
    files = expand_inputs(paths)
    return sorted(files, key=lambda f: (first_time(f), f.removesuffix(".gz")))


def numbered_lines(paths: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, line) over the files in the order their events were written."""
    for f in in_order(paths):
        for no, line in enumerate(read_lines(f), 1):
            yield f, no, line


def events(paths: list[str]) -> Iterator[dict]:  # type: ignore[type-arg]
    """Every event that parses, over the files in the order their events were written."""
    import orjson

    for _f, _no, raw in numbered_lines(paths):
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            yield ev
