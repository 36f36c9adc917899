"""Input formats as plug-ins: one module per format, one registry (``FORMATS``).

A format says whether it recognises a path (from its suffix and, for tables, its header) and
reads it into a ``RawRead``: candidates for the canonical path plus side tables (patients,
outcomes, cohort) and unmapped counts. Adding a format touches its module and this list only.
Order matters: the first format that recognises a path reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig
from ingest.raw import RawRead, StructuralError, header_columns

TABLE_SUFFIXES = {".csv", ".tsv", ".txt", ".parquet"}


class Format(Protocol):
    #: the name in reports and in ``ingest.default_source``
    name: str
    #: True for formats read as a whole directory (PSV: one file per patient)
    directory: bool

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool: ...

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead: ...


def _registry() -> list[Format]:
    from ingest.formats.fhir_files import FhirBundle, FhirNdjson
    from ingest.formats.hl7v2 import Hl7v2
    from ingest.formats.long import LongTable
    from ingest.formats.psv import PsvAnchors, PsvDirectory, PsvFile
    from ingest.formats.tables import CohortTable, OutcomesTable, PatientsTable
    from ingest.formats.wide import WideTable

    return [
        FhirNdjson(),
        FhirBundle(),
        Hl7v2(),
        PsvDirectory(),
        PsvFile(),
        PsvAnchors(),
        LongTable(),
        CohortTable(),
        PatientsTable(),
        OutcomesTable(),
        WideTable(),
    ]


FORMATS: list[Format] = []


def formats() -> list[Format]:
    if not FORMATS:
        FORMATS.extend(_registry())
    return FORMATS


EXPECTED_FORMATS = (
    "long CSV/Parquet (patient_id,time,code,value[,unit,source]), wide CSV (patient_id,time + "
    "mapped columns), patients CSV (patient_id, consent_*), outcomes CSV (patient_id,time,event), "
    "cohort CSV (patient_id,index_time,...), FHIR .ndjson/.json, HL7 v2 .hl7, PhysioNet .psv"
)


def detect(path: Path, cfg: IngestConfig, vocab: Vocabulary) -> Format:
    """The format of one file (or PSV directory), else ``StructuralError`` naming it."""
    header = None
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        if path.stat().st_size == 0:
            raise StructuralError(f"{path}: empty file (expected a header line)")
        header = header_columns(path)
    for fmt in formats():
        if fmt.directory != path.is_dir():
            continue
        if fmt.recognise(path, header, cfg, vocab):
            return fmt
    what = "header not recognised" if header is not None else repr(path.suffix or "(no extension)")
    raise StructuralError(f"{path}: unknown format ({what}); expected one of: {EXPECTED_FORMATS}")
