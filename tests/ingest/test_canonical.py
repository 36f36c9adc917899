"""The canonical observation path on hand-made records: units, ranges, thresholds, times."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ingest.canonical import NAT_NS, Reason, TimeWindow, canonicalise, from_text
from ingest.ingestion import ingest
from tests.ingest.conftest import KEY, balanced

T = "2026-01-05T08:00:00Z"
NOW = pd.Timestamp("2026-01-06T00:00:00Z").value
WINDOW = TimeWindow(
    earliest_ns=pd.Timestamp("1990-01-01T00:00:00Z").value,
    max_future_ns=5 * 60 * 10**9,
    max_history_ns=30 * 86_400 * 10**9,
)


def judge(vocab, rows, window=WINDOW, ref=NOW):
    code, value, unit, time = zip(*rows, strict=True)
    res = canonicalise(from_text(code, value, unit, time), vocab, window, NOW, ref)
    return res, [Reason(int(r)) for r in res.reason]


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected", "canonical"),
    [
        ("o2_support", "-50", "{FiO2}", Reason.INPUT_OUT_OF_RANGE, None),  # not a valid 0/1
        ("o2_support", "4000", "{FiO2}", Reason.INPUT_OUT_OF_RANGE, None),
        ("o2_support", "0.21", "{FiO2}", Reason.ACCEPTED, 0.0),  # room air
        ("o2_support", "0.35", "{FiO2}", Reason.ACCEPTED, 1.0),
        ("o2_support", "12", "L/min", Reason.ACCEPTED, 1.0),
        ("o2_support", "-1", "L/min", Reason.INPUT_OUT_OF_RANGE, None),
        ("creatinine", "0.09999084", "mg/dL", Reason.ACCEPTED, 0.09999084),  # within tolerance
        ("creatinine", "0.0999", "mg/dL", Reason.OUT_OF_RANGE, None),  # 0.1% below: refused
        ("creatinine", "88.4", "umol/L", Reason.ACCEPTED, 1.0),
        ("glucose", "65", "", Reason.MISSING_UNIT, None),  # mg/dL or mmol/L? refused
        ("glucose", "65", "mg/dL", Reason.ACCEPTED, 65 * 0.05551),
        ("body_temp", "100.4", "[degF]", Reason.ACCEPTED, 38.0),  # converted, then range
        ("body_temp", "100.4", "", Reason.OUT_OF_RANGE, None),  # default Cel: implausible
        ("heart_rate", "80", "", Reason.ACCEPTED, 80.0),  # default unit /min
        ("heart_rate", "80", "kg", Reason.UNKNOWN_UNIT, None),
        ("heart_rate", "inf", "/min", Reason.UNPARSEABLE_VALUE, None),
        ("consciousness", "V", "", Reason.ACCEPTED, 2.0),
        ("consciousness", "sleepy", "", Reason.UNPARSEABLE_VALUE, None),
        ("8867-4", "70", "/min", Reason.ACCEPTED, 70.0),  # LOINC
        ("9999-9", "70", "/min", Reason.UNKNOWN_CODE, None),
        ("", "70", "/min", Reason.MISSING_CODE, None),
        ("heart_rate", "", "/min", Reason.MISSING_VALUE, None),
    ],
)
def test_one_record(vocab, code, value, unit, expected, canonical):
    res, reasons = judge(vocab, [(code, value, unit, T)])
    assert reasons == [expected], res.message(0)
    if canonical is not None:
        assert res.value[0] == pytest.approx(canonical, rel=1e-9)
    if expected != Reason.ACCEPTED:
        assert res.message(0)  # every refusal explains itself


def test_messages_name_what_was_expected(vocab):
    res, _ = judge(
        vocab,
        [
            ("o2_support", "4000", "{FiO2}", T),
            ("glucose", "65", "", T),
            ("body_temp", "212", "[degF]", T),
        ],
    )
    assert "outside plausible input range [0.21, 1]" in res.message(0)
    assert "no unit for glucose" in res.message(1) and "mg/dL" in res.message(1)
    assert res.message(2).startswith("out-of-range value: body_temp value 212 [degF] = 100 Cel")


def test_unitless_column_is_named(vocab):
    c = from_text(["glucose"], ["65"], [""], [T], column=["Glucose"])
    res = canonicalise(c, vocab)
    assert res.reason[0] == Reason.MISSING_UNIT
    assert "column 'Glucose'" in res.message(0)


def test_time_window(vocab):
    res, reasons = judge(
        vocab,
        [
            ("heart_rate", "80", "/min", "1970-01-01T00:00:00Z"),  # epoch 0
            ("heart_rate", "80", "/min", "1926-01-05T08:00:00Z"),  # a century ago
            ("heart_rate", "80", "/min", "2026-01-06T00:10:00Z"),  # 10 min after now
            ("heart_rate", "80", "/min", "2025-11-01T00:00:00Z"),  # > 30 days before ref
            ("heart_rate", "80", "/min", "2026-01-06T00:04:00Z"),  # within tolerance
        ],
    )
    assert reasons == [
        Reason.TIME_BEFORE_EARLIEST,
        Reason.TIME_BEFORE_EARLIEST,
        Reason.TIME_IN_FUTURE,
        Reason.TIME_TOO_OLD,
        Reason.ACCEPTED,
    ]
    assert "in the future" in res.message(2) and "30 days before" in res.message(3)


def test_per_record_reference(vocab):
    """Scoring counts history back from each patient's as_of."""
    c = from_text(["heart_rate"] * 2, ["80"] * 2, ["/min"] * 2, ["2025-12-01T00:00:00Z"] * 2)
    ref = np.array([pd.Timestamp("2025-12-02T00:00:00Z").value, NOW], dtype=np.int64)
    res = canonicalise(c, vocab, WINDOW, NOW, ref)
    assert [Reason(int(r)) for r in res.reason] == [Reason.ACCEPTED, Reason.TIME_TOO_OLD]


def test_reader_reasons_win(vocab):
    c = from_text(["heart_rate", "heart_rate"], ["80", "80"], ["/min"] * 2, ["yesterday", T])
    assert c.time_ns[0] == NAT_NS
    res = canonicalise(c, vocab, WINDOW, NOW)
    assert [Reason(int(r)) for r in res.reason] == [Reason.UNPARSEABLE_TIME, Reason.ACCEPTED]
    assert res.message(0) == "unparseable time 'yesterday': expected ISO 8601"


def test_large_input_matches_small(vocab):
    """The >4096-record grouping path gives the same verdicts as the small one."""
    rng = np.random.default_rng(0)
    codes = rng.choice(["heart_rate", "spo2", "o2_support", "glucose", "zzz"], 6000)
    units = np.where(codes == "o2_support", "{FiO2}", np.where(codes == "glucose", "mg/dL", ""))
    values = rng.normal(50, 40, 6000).round(2).astype(str)
    times = np.full(6000, T, dtype=object)
    big = canonicalise(from_text(codes, values, units, times), vocab, WINDOW, NOW)
    for lo in range(0, 6000, 1000):
        sl = slice(lo, lo + 1000)
        small = canonicalise(
            from_text(codes[sl], values[sl], units[sl], times[sl]), vocab, WINDOW, NOW
        )
        assert (small.reason == big.reason[sl]).all()
        np.testing.assert_array_equal(small.value, big.value[sl])


def test_fio2_column_feeds_two_codes_through_ingest(write, cfg, vocab):
    p = write(
        "wide.csv",
        "patient_id,time,FiO2\nMRN-1,2026-01-05T07:00:00Z,0.4\nMRN-1,2026-01-05T08:00:00Z,-50\n",
    )
    two = [{"code": "fio2", "unit": "1"}, {"code": "o2_support", "unit": "{FiO2}"}]
    cfg = type(cfg).model_validate({"missing_consent": "include", "wide_columns": {"FiO2": two}})
    res = ingest([p], cfg, vocab, KEY)
    obs = res.observations.astype({"code": str})
    got = obs.sort_values("code")[["code", "value"]].values.tolist()
    assert got == [["fio2", 0.4], ["o2_support", 1.0]]
    assert res.quarantine["reason"].str.startswith("out-of-range value").sum() == 2
    assert balanced(res.report)
