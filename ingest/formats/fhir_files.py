"""FHIR R4 files: ``.ndjson``/``.jsonl`` (one resource per line, bulk export) and ``.json``
(a Bundle or a single resource). Both go through the one Observation parser, ``ingest.fhir``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig
from ingest.fhir import parse_resources
from ingest.raw import Problem, RawRead, StructuralError, read_lines, text_read


def fhir_read(
    path: Path,
    fmt: str,
    resources: list[tuple[int, Any]],
    problems: list[Problem],
    cfg: IngestConfig,
    vocab: Vocabulary,
) -> RawRead:
    default = cfg.default_source.get(fmt) or cfg.default_source.get("fhir", "ward")
    recs = parse_resources(resources, vocab, default, cfg.preliminary, cfg.fhir_validate)
    for p in recs.problems:
        problems.append(Problem(p.line, p.field, p.reason, "", p.code))
    rr = text_read(
        str(path),
        fmt,
        np.array(recs.subject, dtype=object),
        np.array(recs.time, dtype=object),
        np.array(recs.code, dtype=object),
        np.array(recs.value, dtype=object),
        np.array(recs.unit, dtype=object),
        np.array(recs.source, dtype=object),
        np.array(recs.line, dtype=np.int64),
        cfg.naive_time,
        default,
        pre=np.array(recs.pre, dtype=np.uint8),
        detail=recs.detail,
    )
    rr.problems = problems
    if recs.patients:
        pats = pd.DataFrame(recs.patients).rename(columns={"patient_id": "source_id"})
        rr.derived_patients = pats.drop(columns=["line"])
    return rr


class FhirNdjson:
    name = "fhir_ndjson"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return path.suffix.lower() in (".ndjson", ".jsonl")

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        lines, problems = read_lines(path)
        bad = {p.line for p in problems}
        resources: list[tuple[int, Any]] = []
        for i, ln in enumerate(lines, start=1):
            if i in bad or not ln.strip():
                continue
            try:
                resources.append((i, json.loads(ln)))
            except json.JSONDecodeError as exc:
                why = f"broken JSON line: {exc.msg} at column {exc.colno}"
                problems.append(Problem(i, "json", why, ln))
        rr = fhir_read(path, self.name, resources, problems, cfg, vocab)
        rr.lines = lines
        return rr


class FhirBundle:
    name = "fhir_json"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return path.suffix.lower() == ".json"

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        """A Bundle (entries' resources) or one resource; records are numbered by entry."""
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise StructuralError(f"{path}: not UTF-8 (expected a FHIR JSON Bundle)") from None
        except json.JSONDecodeError as exc:
            raise StructuralError(
                f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); expected a FHIR Bundle"
            ) from None
        if not isinstance(doc, dict) or "resourceType" not in doc:
            raise StructuralError(f"{path}: expected a FHIR Bundle or resource with resourceType")
        if doc["resourceType"] == "Bundle":
            entries = doc.get("entry") or []
            resources = [e.get("resource") if isinstance(e, dict) else e for e in entries]
        else:
            resources = [doc]
        numbered = list(enumerate(resources, start=1))
        rr = fhir_read(path, self.name, numbered, [], cfg, vocab)
        rr.records = {i: json.dumps(r, separators=(",", ":"))[:2000] for i, r in numbered}
        return rr
