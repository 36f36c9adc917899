"""Data collection: validated observations land as long-CSV files that ``vitalrisk ingest`` reads.

Each accepted request writes one new file (``api-<UTC time>-<request id>.csv``) atomically
(temp file, fsync, rename), so a half-written file is never visible to the next ingest run.
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


def write_landing(rows: Sequence[dict[str, Any]], landing_dir: Path, request_id: str) -> Path:
    """Write one long-CSV file atomically; returns its path."""
    landing_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = landing_dir / f"api-{stamp}-{request_id[:12]}.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LANDING_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = landing_dir / f".{final.name}.tmp"
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final
