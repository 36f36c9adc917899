"""Time parsing edge cases and ids that arrive already pseudonymised (the service's landing files)."""

from __future__ import annotations

import pandas as pd

from governance.pseudonym import pseudonymise
from ingest.canonical import NAT_NS, Reason, parse_time_text
from ingest.config import IngestConfig
from ingest.ingestion import ingest
from tests.ingest.conftest import KEY, balanced


def test_mixed_offsets_and_naive_times_in_one_column():
    # pandas 2.3 alone would give the naive string the previous string's +01:00 offset
    s = pd.Series(
        [
            "2026-01-05T08:00:00+01:00",
            "2026-01-05 09:30:00",
            "2026-01-05T08:00:00-05:00",
            "2026-01-05T08:00:00Z",
            "nope",
            "",
        ]
    )
    ns, why = parse_time_text(s, "reject")
    assert ns[0] == pd.Timestamp("2026-01-05T07:00:00Z").value
    assert ns[1] == pd.Timestamp("2026-01-05T09:30:00Z").value
    assert ns[2] == pd.Timestamp("2026-01-05T13:00:00Z").value
    assert ns[3] == pd.Timestamp("2026-01-05T08:00:00Z").value
    assert ns[4] == ns[5] == NAT_NS
    assert why.tolist() == [
        0,
        Reason.NAIVE_TIME,
        0,
        0,
        Reason.UNPARSEABLE_TIME,
        Reason.MISSING_TIME,
    ]


def test_landing_file_with_pseudonyms_meets_raw_consent_table(write, vocab):
    pid1, pid2 = pseudonymise("MRN-000001", KEY), pseudonymise("MRN-000002", KEY)
    pats = write(
        "patients.csv",
        "patient_id,consent_model_training\nMRN-000001,true\nMRN-000002,false\n",
    )
    landing = write(
        "landing/api-1.csv",
        "patient_id,time,code,value,unit,source\n"
        f"{pid1},2026-01-05T08:00:00Z,heart_rate,80,/min,api\n"
        f"{pid2},2026-01-05T08:00:00Z,heart_rate,90,/min,api\n",
    )
    res = ingest([pats, landing], IngestConfig(), vocab, KEY)
    assert res.observations["patient_id"].tolist() == [pid1]
    assert res.patients["patient_id"].tolist() == [pid1]
    assert res.report["consent"]["patients_without_consent_record"] == 0
    assert balanced(res.report)
