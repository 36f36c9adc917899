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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.vocabulary import Vocabulary
from serving.schemas import ObservationItem, Rejected

LANDING_COLUMNS = ["patient_id", "time", "code", "value", "unit", "source"]


def validate_items(
    items: Sequence[Any],
    vocab: Vocabulary,
    pseudonym: Any,
    future_tolerance_minutes: float,
    now: datetime | None = None,
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Split items into canonical rows and rejections (index, field, reason)."""
    now = now or datetime.now(UTC)
    latest = now + timedelta(minutes=future_tolerance_minutes)
    rows: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            rejected.append(Rejected(index=i, field="item", reason="expected a JSON object"))
            continue
        try:
            obs = ObservationItem.model_validate(item)
        except ValidationError as exc:
            err = exc.errors(include_input=False)[0]
            loc = ".".join(str(x) for x in err["loc"]) or "item"
            rejected.append(Rejected(index=i, field=loc, reason=err["msg"]))
            continue
        key = vocab.resolve_code(obs.code)
        if key is None:
            rejected.append(
                Rejected(
                    index=i,
                    field="code",
                    reason=f"unknown code {obs.code!r}: expected a vocabulary key or LOINC code",
                )
            )
            continue
        t = obs.time.astimezone(UTC)
        if t > latest:
            rejected.append(
                Rejected(index=i, field="time", reason=f"{obs.time.isoformat()} is in the future")
            )
            continue
        try:
            value = vocab.to_canonical(key, obs.value, obs.unit)
        except ValueError as exc:
            f = "unit" if str(exc).startswith("unit") else "value"
            rejected.append(Rejected(index=i, field=f, reason=str(exc)))
            continue
        bad = vocab.check_range(key, value)
        if bad:
            rejected.append(Rejected(index=i, field="value", reason=bad))
            continue
        rows.append(
            {
                "patient_id": pseudonym(obs.patient_id),
                "time": t.isoformat().replace("+00:00", "Z"),
                "code": key,
                "value": repr(float(value)),
                "unit": vocab.codes[key].unit,
                "source": obs.source or "api",
            }
        )
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
