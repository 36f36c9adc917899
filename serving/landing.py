"""Data collection: validated observations land as long-CSV files that ``vitalrisk ingest`` reads.

Each accepted request writes one new file (``api-<UTC time>-<request id>.csv``) atomically
(temp file, fsync, rename), so a half-written file is never visible to the next ingest run.
The landing area may be an fsspec URL (``serve.landing_dir`` / ``VITALRISK_LANDING_DIR`` =
``s3://bucket/landing``) shared by every replica: each file is one object, visible only once
completely stored. A landing area that cannot take the file is a 503 (``LogUnavailable``):
nothing was accepted, the client retries.
Values are stored in the canonical unit with the vocabulary key as ``code`` and pseudonymised
``patient_id``; rejected items come back to the caller with reasons and are not stored.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from core.vocabulary import Vocabulary
from ingest.canonical import canonicalise
from serving.schemas import ObservationItem, Rejected
from serving.scoring import _ns_of, observation_candidates, scoring_window

LANDING_COLUMNS = ["patient_id", "time", "code", "value", "unit", "source"]


def validate_items(
    items: Sequence[Any],
    vocab: Vocabulary,
    pseudonym: Any,
    future_tolerance_minutes: float,
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Split items into canonical rows and rejections (index, field, reason).

    The schema checks each item; the canonical observation path (``ingest.canonical``, the
    one ingest applies to the landed file) judges codes, units, values and times, and every
    reason it gives is a rejected item here.
    """
    now = now or datetime.now(UTC)
    rejected: list[Rejected] = []
    valid: list[tuple[int, ObservationItem]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            rejected.append(Rejected(index=i, field="item", reason="expected a JSON object"))
            continue
        try:
            valid.append((i, ObservationItem.model_validate(item)))
        except ValidationError as exc:
            err = exc.errors(include_input=False)[0]
            loc = ".".join(str(x) for x in err["loc"]) or "item"
            rejected.append(Rejected(index=i, field=loc, reason=err["msg"]))
    obs = [o for _, o in valid]
    t_ns = np.array([_ns_of(o.time) for o in obs], dtype=np.int64)
    now_ns = _ns_of(now)
    res = canonicalise(
        observation_candidates(obs, t_ns),
        vocab,
        scoring_window(future_tolerance_minutes),
        now_ns,
        now_ns,
    )
    rows: list[dict[str, Any]] = []
    for j, (i, o) in enumerate(valid):
        if res.reason[j]:
            rejected.append(Rejected(index=i, field=res.field_of(j), reason=res.message(j)))
            continue
        key = res.keys[res.key[j]]
        rows.append(
            {
                "patient_id": pseudonym(o.patient_id),
                "time": o.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "code": key,
                "value": repr(float(res.value[j])),
                "unit": vocab.codes[key].unit,
                "source": o.source or "api",
            }
        )
    rejected.sort(key=lambda r: r.index)
    return rows, rejected


def write_landing(rows: Sequence[dict[str, Any]], landing_dir: Path | str, request_id: str) -> str:
    """Write one long-CSV file atomically; returns its name. A landing area that refuses it
    (full or read-only disk, object store down or refusing the credentials) raises
    ``LogUnavailable`` naming the area, never an error with a row's values."""
    from core import storage
    from core.errors import UserError
    from serving.predlog import LogUnavailable

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"api-{stamp}-{request_id[:12]}.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LANDING_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    try:
        if storage.is_url(landing_dir):
            storage.write_bytes(storage.join(landing_dir, name), data)
            return name
        folder = Path(landing_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except (OSError, UserError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise LogUnavailable(
            f"the landing area {landing_dir} cannot take the file now ({why})"
        ) from None
    return name


#: parsed landing files: (path, size, mtime) -> rows (files are written once, atomically)
_READ_CACHE: dict[tuple[str, int, int], list[tuple[str, str, str, float]]] = {}


def _landed_files(landing_dir: Path | str) -> list[tuple[str, tuple[str, int, int]]]:
    """(location, cache key) of every landed CSV file: local files by name, size and
    modification time; objects by URL and size (written once, never changed)."""
    from core import storage
    from core.errors import UserError
    from serving.predlog import LogUnavailable

    if storage.is_url(landing_dir):
        try:
            found = storage.list_sizes(landing_dir, ".csv")
        except UserError as exc:  # the store does not answer: the page is a 503, retry
            raise LogUnavailable(str(exc)) from None
        return [
            (url, (url, size, 0)) for url, size in found if not storage.name(url).startswith(".")
        ]
    folder = Path(landing_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.csv")):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), (str(path), st.st_size, st.st_mtime_ns)))
    return out


def read_landing(
    landing_dir: Path | str, pseudonyms: set[str] | None = None
) -> list[tuple[str, str, str, float]]:
    """``(patient_id, time, code, value)`` rows of every landed file (API and MQTT), for the
    given pseudonyms (all when None), from a local folder or a shared URL. Files are
    immutable once in place, so each is parsed once per process (cached by name and size,
    and modification time for local files)."""
    from core import storage
    from core.errors import UserError

    out: list[tuple[str, str, str, float]] = []
    for where, key in _landed_files(landing_dir):
        rows = _READ_CACHE.get(key)
        if rows is None:
            rows = []
            try:
                with (
                    storage.open_file(where, "rb") as raw,
                    io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh,
                ):
                    for rec in csv.DictReader(fh):
                        try:
                            rows.append(
                                (rec["patient_id"], rec["time"], rec["code"], float(rec["value"]))
                            )
                        except (KeyError, TypeError, ValueError):
                            continue  # not ours to judge here: ingest quarantines it
            except (OSError, UnicodeDecodeError, UserError):
                continue  # gone or unreadable now: the next read tries again
            if len(_READ_CACHE) > 10_000:
                _READ_CACHE.clear()
            _READ_CACHE[key] = rows
        out.extend(r for r in rows if pseudonyms is None or r[0] in pseudonyms)
    return out
