"""Outcome feedback: request-keyed and patient/time-keyed files become labels, never guesses."""

import pandas as pd
import pytest

from monitoring import outcomes as oc

P1, P2 = "p_" + "1" * 20, "p_" + "2" * 20


@pytest.fixture
def preds():
    t = pd.Timestamp("2026-11-01T00:00", tz="UTC")
    return pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d"],
            "patient_id": [P1, P1, P2, P2],
            "scored_at": [t, t + pd.Timedelta(hours=30), t, t + pd.Timedelta(hours=40)],
        }
    )


def test_request_ids_with_label_or_event(preds):
    f = pd.DataFrame({"request_id": ["a", "b", "zz"], "event": ["icu_transfer", "none", "death"]})
    rows = oc.outcome_rows(f, preds, horizon_hours=24)
    assert dict(zip(rows.request_id, rows.label, strict=True)) == {"a": 1, "b": 0}  # zz unknown
    assert set(rows.patient_id) == {P1}
    assert rows["received_at"].notna().all()


def test_request_and_patient_must_agree(preds):
    f = pd.DataFrame({"request_id": ["a", "c"], "patient_id": [P1, P1], "label": [1, 1]})
    rows = oc.outcome_rows(f, preds, horizon_hours=24)
    assert rows.request_id.tolist() == ["a"]


def test_patient_time_events_label_within_horizon_and_censor_unknowns(preds):
    t = pd.Timestamp("2026-11-01T00:00", tz="UTC")
    f = pd.DataFrame(
        {
            "patient_id": [P1, P2],
            "time": [t + pd.Timedelta(hours=36), t + pd.Timedelta(hours=50)],
            "event": ["rapid_response", "none"],  # P2: discharged event-free at 50 h
        }
    )
    rows = oc.outcome_rows(f, preds, horizon_hours=24).set_index("request_id")
    # a: event at 36 h is beyond a's 24 h horizon, and no later follow-up -> label 0 (known
    # until 36 h >= 24 h); b: event 6 h after -> 1; c: event-free through 50 h -> 0;
    # d: scored at 40 h, known only until 50 h < 64 h -> censored, no label
    assert rows.loc["a", "label"] == 0
    assert rows.loc["b", "label"] == 1
    assert rows.loc["b", "event"] == "rapid_response"
    assert rows.loc["c", "label"] == 0
    assert "d" not in rows.index


def test_bad_files_name_the_problem(tmp_path, preds):
    p = tmp_path / "o.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(oc.OutcomeFileError, match="expected columns request_id"):
        oc.read_outcome_file(p)
    p.write_text("request_id,label\na,7\n")
    with pytest.raises(oc.OutcomeFileError, match="label must be 0 or 1"):
        oc.outcome_rows(oc.read_outcome_file(p), preds, 24)
    with pytest.raises(oc.OutcomeFileError, match="not found"):
        oc.read_outcome_file(tmp_path / "nope.csv")


def test_patient_time_labels_use_each_predictions_training_horizon():
    """Home patients are labelled over 168 h like in training, ward patients over 24 h; the
    horizon the service logged with a prediction wins over the per-setting defaults."""
    t = pd.Timestamp("2026-11-01T00:00", tz="UTC")
    preds = pd.DataFrame(
        {
            "request_id": ["ward", "home", "home-logged", "unknown"],
            "patient_id": [P1, P2, P2, P1],
            "scored_at": [t, t, t, t],
            "setting": ["ward", "home", "home", None],
            "horizon_hours": [None, None, 12.0, None],
        }
    )
    events = pd.DataFrame(
        {
            "patient_id": [P1, P2, P1, P2],
            "time": [t + pd.Timedelta(hours=100)] * 2 + [t + pd.Timedelta(days=9)] * 2,
            "event": ["icu_transfer", "emergency_admission", "none", "none"],
        }
    )
    rows = oc.outcome_rows(events, preds, {"ward": 24, "home": 168}).set_index("request_id")
    assert rows.loc["ward", "label"] == 0  # event at 100 h is after the 24 h ward horizon
    assert rows.loc["home", "label"] == 1  # ... and within the 168 h home horizon
    assert rows.loc["home-logged", "label"] == 0  # the logged 12 h horizon wins
    assert "unknown" not in rows.index  # no setting, no horizon: no label rather than a guess
