"""HL7 v2 ORU^R01 result messages (``.hl7``): the common device and lab feed.

One candidate per OBX segment: OBX-3 code (LOINC or a vocabulary key), OBX-5 value, OBX-6
unit (UCUM), OBX-14 time (else OBR-7, else MSH-7), OBX-11 result status, patient from PID-3
(first identifier), sex and birth date from PID-8/PID-7. Messages are split at each ``MSH``
segment; segments may end in CR (the standard), LF or CRLF. Parsed with ``hl7`` (PyPI).

Result status (HL7 table 0085): F, C, U final or corrected -> data; P, R, S preliminary ->
``ingest.preliminary``; X (cannot be obtained) -> data absent; D, W (deleted, wrong), I, N, O
-> never data. A C, D or W result replaces the earlier results of the same observation in
the file (same PID-3, OBX-3, OBX-4 and time): they are quarantined as superseded, naming the
line that replaced them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.vocabulary import Vocabulary
from ingest.canonical import Reason
from ingest.config import IngestConfig
from ingest.raw import Problem, RawRead, StructuralError, text_read

DATA = {"F", "C", "U", ""}
PRELIMINARY = {"P", "R", "S"}
ABSENT = {"X"}
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?$")


def hl7_time(ts: str) -> str:
    """An HL7 DTM (``YYYYMMDDHHMM[SS[.S]][+ZZZZ]``) as ISO 8601; unparseable text as is."""
    m = _TS.match(ts.strip())
    if not m or m.group(2) is None or m.group(3) is None:
        return ts
    y, mo, d, h, mi, s, frac, off = m.groups()
    iso = f"{y}-{mo}-{d}T{h or '00'}:{mi or '00'}:{s or '00'}{frac or ''}"
    if off:
        iso += f"{off[:3]}:{off[3:]}"
    return iso


def _f(seg: Any, i: int, comp: int = 0) -> str:
    """Field ``i`` (component ``comp``) of a segment as text, '' when absent."""
    try:
        fld = seg[i]
    except (IndexError, KeyError):
        return ""
    try:
        if comp or not isinstance(fld, str):
            rep = fld[0] if not isinstance(fld, str) else fld
            return str(
                rep[comp] if not isinstance(rep, str) else (rep if comp == 0 else "")
            ).strip()
    except (IndexError, TypeError):
        return ""
    return str(fld).strip()


def _status(s: str, preliminary: str) -> tuple[int, str]:
    if s in DATA:
        return 0, ""
    if s in PRELIMINARY:
        if preliminary == "reject":
            return (
                Reason.PRELIMINARY,
                f"OBX-11 status {s}: preliminary, refused (ingest.preliminary: reject)",
            )
        return 0, ""
    if s in ABSENT:
        return Reason.DATA_ABSENT, "data absent (OBX-11 status X: results cannot be obtained)"
    return Reason.STATUS_NOT_DATA, f"OBX-11 status {s!r}: never data (deleted, wrong or pending)"


#: OBX-11 statuses that replace an earlier result of the same observation: C (corrected)
#: supersedes it; D (deleted) and W (wrong: e.g. the wrong patient) withdraw it
REPLACES = {"C": "corrected", "D": "deleted", "W": "withdrawn as wrong"}


def _supersede(rows: dict[str, list[Any]], detail: dict[int, str]) -> None:
    """A C, D or W result makes every earlier result of the same observation (patient PID-3,
    code OBX-3, sub-id OBX-4 and time) not data, as FHIR's later versions do: the later
    message is the truth, and each replaced row says which line replaced it."""
    latest: dict[tuple[str, str, str, str], list[int]] = {}
    for i, status in enumerate(rows["status"]):
        key = (rows["sid"][i], rows["code"][i], rows["sub"][i], rows["time"][i])
        earlier = latest.setdefault(key, [])
        if status in REPLACES:
            for j in earlier:
                if rows["pre"][j] == 0:
                    rows["pre"][j] = int(Reason.SUPERSEDED)
                    detail[j] = (
                        f"superseded: {REPLACES[status]} by OBX-11 {status} on line "
                        f"{rows['line'][i]}"
                    )
            earlier.clear()
        earlier.append(i)


def _messages(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, segments) per message; segment n of the file is line n."""
    segs = re.split(r"\r\n|\r|\n", text)
    out: list[tuple[int, list[str]]] = []
    for i, s in enumerate(segs, start=1):
        if not s.strip():
            continue
        if s.startswith("MSH") or not out:
            out.append((i, []))
        out[-1][1].append(s)
    return out


class Hl7v2:
    name = "hl7v2"
    directory = False

    def recognise(
        self, path: Path, header: list[str] | None, cfg: IngestConfig, vocab: Vocabulary
    ) -> bool:
        return path.suffix.lower() in (".hl7", ".hl7v2")

    def read(self, path: Path, cfg: IngestConfig, vocab: Vocabulary) -> RawRead:
        import hl7

        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise StructuralError(f"{path}: not UTF-8 text (expected HL7 v2 messages)") from None
        lines = re.split(r"\r\n|\r|\n", text)
        problems: list[Problem] = []
        rows: dict[str, list[Any]] = {
            k: [] for k in ("sid", "time", "code", "value", "unit", "line", "pre", "status", "sub")
        }
        detail: dict[int, str] = {}
        patients: list[dict[str, str]] = []
        for first, segs in _messages(text):
            if not segs[0].startswith("MSH"):
                problems.append(
                    Problem(
                        first,
                        "MSH",
                        "not an HL7 v2 message (expected an MSH segment first)",
                        segs[0],
                    )
                )
                continue
            try:
                msg = hl7.parse("\r".join(segs))
                mtype = str(msg.segment("MSH")[9])
            except Exception as exc:
                problems.append(
                    Problem(
                        first, "message", f"unparseable HL7 v2 message: {str(exc)[:120]}", segs[0]
                    )
                )
                continue
            if not mtype.startswith("ORU"):
                problems.append(
                    Problem(
                        first, "MSH-9", f"message type {mtype!r} is not ORU^R01 (results)", segs[0]
                    )
                )
                continue
            self._message(msg, segs, first, cfg, rows, detail, patients)
        _supersede(rows, detail)
        default = cfg.default_source.get(self.name, "ward")
        rr = text_read(
            str(path),
            self.name,
            np.array(rows["sid"], dtype=object),
            np.array(rows["time"], dtype=object),
            np.array(rows["code"], dtype=object),
            np.array(rows["value"], dtype=object),
            np.array(rows["unit"], dtype=object),
            default,
            np.array(rows["line"], dtype=np.int64),
            cfg.naive_time,
            default,
            pre=np.array(rows["pre"], dtype=np.uint8),
            detail=detail,
        )
        rr.problems, rr.lines = problems, lines
        if patients:
            rr.derived_patients = pd.DataFrame(patients).drop_duplicates("source_id")
        return rr

    def _message(
        self,
        msg: Any,
        segs: list[str],
        first: int,
        cfg: IngestConfig,
        rows: dict[str, list[Any]],
        detail: dict[int, str],
        patients: list[dict[str, str]],
    ) -> None:
        msh_time = hl7_time(_f(msg.segment("MSH"), 7))
        try:
            pid = msg.segment("PID")
        except KeyError:
            pid = None
        sid = _f(pid, 3, 0) if pid is not None else ""
        if sid:
            sex = {"F": "F", "M": "M"}.get(_f(pid, 8).upper(), "")
            patients.append({"source_id": sid, "sex": sex, "birth_date": _f(pid, 7)})
        obr_time = ""
        for k, seg in enumerate(msg):
            kind = str(seg[0])
            if kind == "OBR":
                obr_time = hl7_time(_f(seg, 7))
            if kind != "OBX":
                continue
            t = hl7_time(_f(seg, 14)) if _f(seg, 14) else (obr_time or msh_time)
            pre, why = _status(_f(seg, 11).upper(), cfg.preliminary)
            if pre == 0 and not sid:
                pre, why = Reason.MISSING_PATIENT, "missing field: PID-3 (patient identifier)"
            value = _f(seg, 5, 0) if _f(seg, 2).upper() in ("CE", "CWE", "CNE") else _f(seg, 5)
            i = len(rows["sid"])
            rows["sid"].append(sid)
            rows["time"].append(t)
            rows["code"].append(_f(seg, 3, 0))
            rows["value"].append(value)
            rows["unit"].append(_f(seg, 6, 0))
            rows["line"].append(first + k)
            rows["pre"].append(int(pre))
            rows["status"].append(_f(seg, 11).upper())
            rows["sub"].append(_f(seg, 4))
            if why:
                detail[i] = why
