"""The scanner used by the pipeline privacy test must itself find hidden identifiers."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from tests.governance.leakscan import scan

RAW = ["MRN-000042", "MRN-000043"]


def test_clean_folder_has_no_hits(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"patient_id": "p_0123456789abcdef0123"}')
    assert scan(tmp_path, RAW) == []


@pytest.mark.parametrize(
    "kind", ["text", "gzip", "parquet_snappy", "parquet_dict_gzip", "sqlite", "filename"]
)
def test_finds_planted_identifier(tmp_path: Path, kind: str) -> None:
    if kind == "text":
        (tmp_path / "report.html").write_text("<td>MRN-000042</td>")
    elif kind == "gzip":
        (tmp_path / "log.txt.gz").write_bytes(gzip.compress(b"scored MRN-000043 ok"))
    elif kind.startswith("parquet"):
        df = pd.DataFrame(
            {"pid": pd.Categorical(["MRN-000042"] * 50 + ["x"] * 50), "v": range(100)}
        )
        comp = "snappy" if kind == "parquet_snappy" else "gzip"
        df.to_parquet(tmp_path / "f.parquet", compression=comp)
    elif kind == "sqlite":
        con = sqlite3.connect(tmp_path / "db.sqlite")
        con.execute("create table t (x text)")
        con.execute("insert into t values ('MRN-000043')")
        con.commit()
        con.close()
    else:
        (tmp_path / "MRN-000042.psv").write_text("HR|O2Sat\n")
    hits = scan(tmp_path, RAW)
    assert hits, kind
    assert all("MRN-00004" in h for h in hits)
