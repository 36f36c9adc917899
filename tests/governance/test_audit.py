"""Audit chain: appends from several processes stay linear; verify catches every kind of tamper."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governance.audit import GENESIS_HASH, AuditLog, default_audit_path
from governance.pseudonym import DEMO_KEY, pseudonymise

P1 = pseudonymise("MRN-0001", DEMO_KEY.encode())
P2 = pseudonymise("MRN-0002", DEMO_KEY.encode())


@pytest.fixture(autouse=True)
def _no_audit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITALRISK_AUDIT_KEY", raising=False)


def _filled(path: Path, n: int = 5, key: bytes | None = None) -> AuditLog:
    log = AuditLog(path, key=key)
    for i in range(n):
        log.append("tester", "read", f"patient/{i}", patients=[P1, P2], details={"i": i})
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_append_chains_entries(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.jsonl")
    e1 = log.append("svc", "predict", "/predict", patients=[P1], model_version="3")
    e2 = log.append("lead", "promote", "models:/m@champion", model_version="4", details={"x": 1})
    assert (e1["seq"], e2["seq"]) == (1, 2)
    assert e1["prev_hash"] == GENESIS_HASH and e2["prev_hash"] == e1["hash"]
    assert e1["ts"].endswith("+00:00")
    res = log.verify()
    assert res.ok and res.entries == 2 and res.head_hash == e2["hash"]
    assert log.head() == (2, e2["hash"])
    assert [e["action"] for e in log.entries()] == ["predict", "promote"]


def test_refuses_raw_patient_ids(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="pseudonyms") as exc:
        log.append("svc", "predict", "/predict", patients=[P1, "MRN-0001"])
    assert "MRN-0001" not in str(exc.value)
    with pytest.raises(ValueError):
        log.append("svc", "predict", "/predict", patients=P1)  # type: ignore[arg-type]
    assert not (tmp_path / "audit.jsonl").exists() or log.verify().entries == 0


def test_default_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VITALRISK_AUDIT_LOG", raising=False)
    assert default_audit_path() == Path("logs/audit.jsonl")
    monkeypatch.setenv("VITALRISK_AUDIT_LOG", str(tmp_path / "x.jsonl"))
    assert default_audit_path() == tmp_path / "x.jsonl"
    assert AuditLog().path == tmp_path / "x.jsonl"


def _writer(path: str, worker: int, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append(f"worker-{worker}", "read", f"r/{i}", patients=[P1])


def test_concurrent_appends_from_processes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    res = AuditLog(path).verify()
    assert res.ok, res.reason
    assert res.entries == 100 and res.head_seq == 100
    assert not res.warnings


def test_detects_edited_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["actor"] = "someone-else"
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 3 and "edited" in res.reason


def test_detects_removed_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path)
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines), encoding="utf-8")
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2


def test_detects_reordered_pair(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines), encoding="utf-8")
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2 and "reordered" in res.reason


def test_detects_inserted_entry_even_with_recomputed_hash(tmp_path: Path) -> None:
    """An attacker without the key forges an entry with a correct SHA-256 and renumbers."""
    path = tmp_path / "audit.jsonl"
    key = b"audit-secret"
    log = _filled(path, key=key)
    lines = _lines(path)
    first = json.loads(lines[0])
    fake = {**first, "seq": 2, "actor": "intruder", "prev_hash": first["hash"], "alg": "sha256"}
    fake.pop("hash")
    from governance.audit import canonical_json, entry_hash

    fake["hash"] = entry_hash(fake, None)
    lines.insert(1, canonical_json(fake) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2
    # plain (unkeyed) log: a naive insertion without renumbering is caught by seq/prev_hash
    path2 = tmp_path / "plain.jsonl"
    log2 = _filled(path2)
    lines2 = _lines(path2)
    lines2.insert(3, lines2[0])
    path2.write_text("".join(lines2), encoding="utf-8")
    res2 = log2.verify()
    assert not res2.ok and res2.first_bad_seq == 4


def test_keyed_log_needs_key_and_resists_recomputation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path, key=b"k1")
    assert log.verify().ok
    assert not AuditLog(path, key=b"wrong").verify().ok
    res = AuditLog(path, key=None).verify()
    assert not res.ok and "VITALRISK_AUDIT_KEY" in res.reason


def test_detects_truncated_tail_via_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path)
    lines = _lines(path)
    path.write_text("".join(lines[:-2]), encoding="utf-8")
    res = log.verify()
    assert not res.ok and "truncated" in res.reason and res.first_bad_seq == 4


def test_detects_truncated_tail_via_external_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path)
    anchor = log.head()
    lines = _lines(path)
    path.write_text("".join(lines[:-1]), encoding="utf-8")
    log.head_path.unlink()  # the attacker removed the sidecar too
    res = log.verify()
    assert res.ok and any("anchor" in w for w in res.warnings)
    res = log.verify(anchor=anchor)
    assert not res.ok and "truncated" in res.reason


def test_torn_tail_blocks_append(tmp_path: Path) -> None:
    from governance.audit import AuditLogError

    path = tmp_path / "audit.jsonl"
    log = _filled(path, n=2)
    with path.open("ab") as fh:
        fh.write(b'{"seq": 3, "act')
    assert not log.verify().ok
    with pytest.raises(AuditLogError):
        log.append("svc", "read", "x")


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    """BentoML runs the append in a worker thread: threads of one process must serialise too."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: log.append("t", "read", f"r/{i}", patients=[P2]), range(80)))
    res = log.verify()
    assert res.ok and res.entries == 80, res.reason


def test_cli_verify_show_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.cli import main

    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", DEMO_KEY)
    log = _filled(path, n=3)
    log.append("svc", "predict", "/predict", patients=[P1])
    assert main(["audit", "verify", "--log", str(path)]) == 0
    assert "OK, 4 entries" in capsys.readouterr().out
    assert main(["audit", "head", "--log", str(path)]) == 0
    anchor = capsys.readouterr().out.strip()
    assert anchor == f"4:{log.head()[1]}"
    assert main(["audit", "show", "--log", str(path), "--action", "predict"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    # subject access: the raw id is pseudonymised with the key, and never printed
    assert main(["audit", "show", "--log", str(path), "--source-id", "MRN-0002"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3 and "MRN-0002" not in out
    lines = _lines(path)
    path.write_text("".join(lines[:-1]), encoding="utf-8")
    log.head_path.unlink()
    assert main(["audit", "verify", "--log", str(path), "--anchor", anchor]) == 1
    assert "TAMPERED at seq 4" in capsys.readouterr().err
    assert main(["audit", "verify", "--log", str(path), "--anchor", "x"]) == 2


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(min_value=2, max_value=8),
    op=st.sampled_from(["edit", "delete", "swap", "duplicate", "truncate"]),
    data=st.data(),
)
def test_any_single_tamper_is_detected(
    tmp_path: Path, n: int, op: str, data: st.DataObject
) -> None:
    path = tmp_path / f"h{n}{op}{data.draw(st.integers(0, 10**9))}.jsonl"
    log = _filled(path, n=n)
    lines = _lines(path)
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    if op == "edit":
        entry = json.loads(lines[i])
        field = data.draw(st.sampled_from(["actor", "resource", "ts", "details", "patients"]))
        entry[field] = None if entry[field] is not None else "x"
        lines[i] = json.dumps(entry) + "\n"
    elif op == "delete":
        del lines[i]
    elif op == "swap":
        j = i + 1 if i + 1 < n else i - 1
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    else:
        lines = lines[: max(i, 1) - 1] if i else lines[:-1]
    path.write_text("".join(lines), encoding="utf-8")
    res = log.verify()
    assert not res.ok, (op, i, n)


# -- canonical lines, group commit, torn-tail recovery ---------------------------------------
def _replace_line(path: Path, i: int, text: str) -> None:
    lines = _lines(path)
    lines[i] = text
    path.write_text("".join(lines), encoding="utf-8")


def test_duplicate_key_forgery_is_rejected(tmp_path: Path) -> None:
    """A parser keeps the last of two equal keys: a forged first value would pass a hash check
    done on the parsed entry, so verify refuses any line that is not canonical JSON."""
    path = tmp_path / "audit.jsonl"
    log = _filled(path, n=3)
    line = _lines(path)[1]
    assert line.startswith('{"action":')
    _replace_line(path, 1, '{"actor":"intruder",' + line[1:])
    assert json.loads(_lines(path)[1])["actor"] == "tester"  # what a naive reader sees
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2 and "duplicate key 'actor'" in res.reason


@pytest.mark.parametrize(
    ("rewrite", "needle"),
    [
        (lambda e: json.dumps(e, sort_keys=True) + "\n", "not canonical"),  # whitespace
        (
            lambda e: json.dumps(dict(reversed(list(e.items()))), separators=(",", ":")) + "\n",
            "not canonical",
        ),
        (
            lambda e: json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n",
            "not canonical",
        ),  # \u escapes
        (lambda e: json.dumps({**e, "details": {"x": float("nan")}}) + "\n", "NaN is not JSON"),
    ],
    ids=["whitespace", "reordered", "ascii-escaped", "nan"],
)
def test_non_canonical_lines_are_rejected(tmp_path: Path, rewrite: Any, needle: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("tester", "read", f"r/{i}", patients=[P1], details={"note": "café"})
    entry = json.loads(_lines(path)[1])
    _replace_line(path, 1, rewrite(entry))
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2 and needle in res.reason, res.reason


def test_last_line_without_newline_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _filled(path, n=2)
    path.write_bytes(path.read_bytes()[:-1])
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 2 and "incomplete line" in res.reason


def test_append_refuses_non_finite_details(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="NaN"):
        log.append("svc", "read", "x", details={"p": float("inf")})
    assert not log.path.exists() or log.path.read_bytes() == b""


def test_append_many_is_one_ordered_durable_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from governance.audit import AuditRecord

    log = _filled(tmp_path / "audit.jsonl", n=2)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    recs = [AuditRecord("svc", "predict", f"POST /v1/score#{i}", [P1]) for i in range(50)]
    out = log.append_many(recs)
    assert len(calls) == 1  # the whole group shares one fsync
    assert [e["seq"] for e in out] == list(range(3, 53))
    assert [e["resource"] for e in log.entries()][2:] == [r.resource for r in recs]
    assert log.verify().ok and log.head() == (52, out[-1]["hash"])
    # all or nothing: one raw id in the batch and nothing is written
    with pytest.raises(ValueError, match="pseudonyms"):
        log.append_many([recs[0], AuditRecord("svc", "predict", "x", ["MRN-1"])])
    assert log.head()[0] == 52


def test_prepare_moves_a_torn_tail_aside_and_records_it(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "audit.jsonl"
    log = _filled(path, n=3)
    fragment = b'{"action":"predict","actor":"admin","details":{"requ'
    with path.open("ab") as fh:
        fh.write(fragment)
    assert not log.verify().ok
    log.prepare()
    res = log.verify()
    assert res.ok, res.reason
    last = list(log.entries())[-1]
    assert last["seq"] == 4 and last["action"] == "audit_recovered"
    assert last["details"]["torn_bytes"] == len(fragment)
    assert last["details"]["torn_sha256"] == hashlib.sha256(fragment).hexdigest()
    assert (tmp_path / last["details"]["saved_as"]).read_bytes() == fragment
    log.prepare()  # nothing torn: nothing to do
    assert log.head()[0] == 4


def test_prepare_leaves_a_complete_invalid_tail_alone(tmp_path: Path) -> None:
    from governance.audit import AuditLogError

    path = tmp_path / "audit.jsonl"
    log = _filled(path, n=2)
    with path.open("ab") as fh:
        fh.write(b"not an entry\n")
    before = path.read_bytes()
    log.prepare()
    assert path.read_bytes() == before
    with pytest.raises(AuditLogError, match="not a valid audit entry"):
        log.check_writable()


def test_check_writable_names_an_unwritable_log(tmp_path: Path) -> None:
    from governance.audit import AuditLogError

    path = tmp_path / "audit.jsonl"
    path.mkdir()  # root ignores permissions; a directory in the way fails for everyone
    with pytest.raises(AuditLogError, match="cannot open"):
        AuditLog(path).check_writable()


def test_head_interval_holds_the_sidecar_back_until_close(tmp_path: Path) -> None:
    """A long-lived writer (the service) rewrites the head at most every head_interval: in
    between verify sees it behind (a warning, not tampering); close brings it up to date."""
    log = AuditLog(tmp_path / "audit.jsonl", head_interval=3600)
    for i in range(5):
        log.append("svc", "read", f"r/{i}")
    res = log.verify()
    assert res.ok and any("behind" in w for w in res.warnings)
    log.close()
    res = log.verify()
    assert res.ok and not res.warnings and log.head()[0] == 5


def test_kept_open_writer_interleaves_with_others_and_follows_the_path(tmp_path: Path) -> None:
    """The service keeps its descriptor and remembers its own tail: another writer's entries
    in between, a log moved away or replaced, and threads all keep one linear chain."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "audit.jsonl"
    svc = AuditLog(path, keep_open=True)
    cli = AuditLog(path)
    svc.append("svc", "predict", "a", patients=[P1])
    cli.append("lead", "promote", "models:/m@champion")  # another process's entry
    svc.append("svc", "predict", "b")
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: svc.append("t", "read", f"r/{i}"), range(40)))
    res = svc.verify()
    assert res.ok and res.entries == 43, res.reason
    path.rename(tmp_path / "old.jsonl")  # rotated away: the next append starts a new file
    assert svc.append("svc", "predict", "c")["seq"] == 1
    path.unlink()
    path.mkdir()  # replaced by something that cannot be appended to
    with pytest.raises(OSError):
        svc.append("svc", "predict", "d")
    svc.close()
    assert AuditLog(tmp_path / "old.jsonl").verify().ok
