"""Which files an ingest reads: inputs expanded to (path, format) units, safely.

A directory stands for every recognised file inside it, recursively; a directory holding
``.psv`` files is one PSV unit. The walk never follows a link out of the input's tree, never
enters a directory twice (symlink loops, two links to ``.``), and never opens anything but a
regular file (a FIFO would block the read forever). Dangling links, special and unreadable
files are named in the report (``skipped``), or stop the run when ``ingest.unreadable:
error``; unrecognised files are listed as skipped too. Explicitly named inputs must exist, be
regular files or directories and be recognised.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig
from ingest.formats import Format, detect
from ingest.raw import StructuralError


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def inside(path: Path, root: Path) -> bool:
    """True when ``path`` (links resolved) lies within the resolved ``root``."""
    real = os.path.realpath(path)
    base = os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def problem_of(path: Path, root: Path | None) -> str | None:
    """Why ``path`` must not be read ('' = read it), without opening it."""
    try:
        lst = os.lstat(path)
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            return f"dangling link (to {os.readlink(path)!r})"
        if root is not None and not inside(path, root):
            return "link out of the input tree (not followed)"
    else:
        st = lst
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{_kind(st.st_mode)}, not a regular file"
    if not os.access(path, os.R_OK):
        return "unreadable (permission denied)"
    return None


def walk_inputs(
    inputs: list[str | Path], cfg: IngestConfig, vocab: Vocabulary
) -> tuple[list[tuple[Path, Format]], list[dict[str, str]]]:
    """(units to read in a stable order, skipped files with the reason)."""
    units: list[tuple[Path, Format]] = []
    skipped: list[dict[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def skip(p: Path, why: str, unreadable: bool) -> None:
        if unreadable and cfg.unreadable == "error":
            raise StructuralError(f"{p}: {why} (ingest.unreadable: error)")
        skipped.append({"path": str(p), "reason": why})

    def walk(d: Path, root: Path) -> None:
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            return  # a loop or a second link to a directory already read
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            skip(d, f"unreadable directory ({exc.strerror})", True)
            return
        psv = [e for e in entries if e.suffix.lower() == ".psv"]
        if any(problem_of(e, root) is None and not e.is_dir() for e in psv):
            units.append((d, detect(d, cfg, vocab)))
        for e in entries:
            if e.name.startswith("."):
                continue
            why = problem_of(e, root)
            if why is not None:
                skip(e, why, not why.startswith("link out"))
                continue
            if e.is_dir():
                walk(e, root)
            elif e.suffix.lower() == ".psv":
                continue  # read with its directory
            else:
                try:
                    fmt = detect(e, cfg, vocab)
                except StructuralError as exc:
                    skip(e, str(exc).split(": ", 1)[-1][:160], False)
                    continue
                if fmt.name != "psv_anchors":
                    units.append((e, fmt))

    for item in inputs:
        p = Path(item)
        if not os.path.lexists(p):
            raise StructuralError(
                f"{p}: file or directory not found (expected an input file or directory)"
            )
        why = problem_of(p, None)
        if why is not None:
            raise StructuralError(f"{p}: {why} (expected an input file or directory)")
        if p.is_dir():
            walk(p, p)
        else:
            units.append((p, detect(p, cfg, vocab)))
    return units, skipped
