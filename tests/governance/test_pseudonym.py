"""Pseudonyms: deterministic per key, different across keys, production mode needs a key."""

from __future__ import annotations

import pandas as pd
import pytest

from governance import pseudonym as ps
from governance.rotation import repseudonymise, rotation_mapping


def test_deterministic_and_key_dependent() -> None:
    a = ps.pseudonymise("MRN-123", b"k1")
    assert a == ps.pseudonymise(" MRN-123 ", b"k1")  # same across runs and sources
    assert ps.is_pseudonym(a)
    assert a != ps.pseudonymise("MRN-123", b"k2")
    assert a != ps.pseudonymise("MRN-124", b"k1")
    assert ps.pseudonymise(a, b"k2") == a  # already pseudonymised ids pass through
    m = ps.pseudonymise_many(["x", "y", "x"], b"k1")
    assert set(m) == {"x", "y"} and all(ps.is_pseudonym(v) for v in m.values())


def test_is_pseudonym_rejects_raw_ids() -> None:
    for raw in ["MRN-123", "p_123", "P_" + "a" * 20, "p_" + "g" * 20, "", None, 12345]:
        assert not ps.is_pseudonym(raw)  # type: ignore[arg-type]


def test_production_mode_requires_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ps.KEY_ENV, raising=False)
    monkeypatch.setenv(ps.MODE_ENV, "production")
    with pytest.raises(ps.PseudonymKeyError, match="production"):
        ps.get_key()
    monkeypatch.setenv(ps.KEY_ENV, "real-secret")
    assert ps.get_key() == b"real-secret"


def test_demo_key_outside_production(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ps.KEY_ENV, raising=False)
    monkeypatch.delenv(ps.MODE_ENV, raising=False)
    assert ps.get_key() == ps.DEMO_KEY.encode()
    assert "DEMO" in caplog.text


def test_key_fingerprint_is_stable_and_not_the_key() -> None:
    assert ps.key_fingerprint(b"k1") == ps.key_fingerprint(b"k1") != ps.key_fingerprint(b"k2")
    assert "k1" not in ps.key_fingerprint(b"k1")[2:]


def test_rotation_maps_old_to_new() -> None:
    raw = ["MRN-1", "MRN-2", "MRN-3"]
    mapping = rotation_mapping(raw, b"old", b"new")
    assert mapping == {ps.pseudonymise(r, b"old"): ps.pseudonymise(r, b"new") for r in raw}
    frame = pd.DataFrame({"patient_id": [ps.pseudonymise("MRN-2", b"old")] * 2, "v": [1, 2]})
    out = repseudonymise(frame, mapping)
    assert list(out["patient_id"]) == [ps.pseudonymise("MRN-2", b"new")] * 2
    assert frame["patient_id"].iloc[0] == ps.pseudonymise("MRN-2", b"old")  # not mutated
    stray = pd.DataFrame({"patient_id": [ps.pseudonymise("MRN-9", b"old")]})
    with pytest.raises(ValueError, match="not in the rotation mapping"):
        repseudonymise(stray, mapping)
    with pytest.raises(ValueError, match="identical"):
        rotation_mapping(raw, b"k", b"k")
