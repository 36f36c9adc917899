"""Long tables (CSV/TSV/Parquet): ``patient_id,time,code,value[,unit,source]``, one row per
measurement; codes as vocabulary keys or LOINC. The service's landing files are this format."""

from __future__ import annotations

from pathlib import Path

from core.vocabulary import Vocabulary
from ingest.config import IngestConfig
from ingest.raw import RawRead, require, table, text_read

REQUIRED = ["patient_id", "time", "code", "value"]


class LongTable:
    name = "long"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        cols = set(header or [])
        # a long table missing one of code/value gets a required-column error, not "unknown"
        return header is not None and (
            {"code", "value"} <= cols or bool({"code", "value"} & cols and "time" in cols)
        )

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        fmt = "long_parquet" if path.suffix.lower() == ".parquet" else "long_csv"
        df, line_no, lines, problems, records = table(path)
        require(path, df.columns, REQUIRED, "long observation table")
        default = cfg.default_source.get(fmt, "unknown")
        rr = text_read(
            str(path),
            fmt,
            df["patient_id"].to_numpy(),
            df["time"].to_numpy(),
            df["code"].to_numpy(),
            df["value"].to_numpy(),
            df["unit"].to_numpy() if "unit" in df else "",
            df["source"].to_numpy() if "source" in df else default,
            line_no,
            cfg.naive_time,
            default,
        )
        rr.problems, rr.lines, rr.records = problems, lines, records
        return rr
