"""Files shaped like the real layouts: FHIR ndjson with every status, HL7 v2 ORU^R01,
PhysioNet 2019 PSV with every column and the label, and a hostile directory tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from core.errors import UserError
from core.vocabulary import load_vocabulary
from ingest.config import IngestConfig
from ingest.ingestion import ingest
from ingest.raw import StructuralError
from tests.ingest.conftest import KEY, balanced

ROOT = Path(__file__).resolve().parents[2]


def obs(rid: str, status: str, value: float, t: str = "2026-01-05T08:00:00Z", **extra) -> dict:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/MRN-000010"},
        "effectiveDateTime": t,
        "valueQuantity": {"value": value, "unit": "/min", "code": "/min"},
        **extra,
    }


def fhir_every_status() -> list[dict]:
    """Each FHIR R4 Observation status, a correction chain, absent data, periods, booleans."""
    period = obs(
        "p1",
        "final",
        70,
        effectivePeriod={"start": "2026-01-05T06:00:00Z", "end": "2026-01-05T07:00:00Z"},
    )
    period.pop("effectiveDateTime")
    issued = obs("i1", "final", 71, issued="2026-01-05T05:00:00Z")
    issued.pop("effectiveDateTime")
    absent = obs("a1", "final", 0)
    absent.pop("valueQuantity")
    absent["dataAbsentReason"] = {"coding": [{"code": "asked-unknown"}]}
    oxygen = obs("o1", "final", 0, code={"coding": [{"code": "3151-8"}]})
    oxygen.pop("valueQuantity")
    oxygen["valueBoolean"] = True
    return [
        obs("f1", "final", 80),
        obs("pr1", "preliminary", 81, t="2026-01-05T08:05:00Z"),
        obs("r1", "registered", 82),
        obs("e1", "entered-in-error", 83),
        obs("c1", "cancelled", 84),
        obs("u1", "unknown", 85, t="2026-01-05T08:10:00Z"),
        obs("v1", "final", 90, t="2026-01-05T09:00:00Z", meta={"versionId": "1"}),
        obs("v1", "amended", 95, t="2026-01-05T09:00:00Z", meta={"versionId": "2"}),
        obs("w1", "final", 100, t="2026-01-05T10:00:00Z", meta={"versionId": "1"}),
        obs("w1", "entered-in-error", 100, t="2026-01-05T10:00:00Z", meta={"versionId": "2"}),
        obs("x1", "corrected", 77, t="2026-01-05T11:00:00Z"),
        period,
        issued,
        absent,
        oxygen,
    ]


def test_fhir_statuses_versions_absent_and_times(write, cfg, vocab):
    p = write("Observation.ndjson", "\n".join(json.dumps(r) for r in fhir_every_status()) + "\n")
    res = ingest([p], cfg, vocab, KEY)
    o = res.observations.astype({"code": str})
    hr = o[o["code"] == "heart_rate"].sort_values("time")
    got = list(zip(hr["time"].dt.strftime("%H:%M"), hr["value"], strict=True))
    # final 80, preliminary 81 and unknown 85 (policy accept), v1 amended to 95, corrected 77,
    # the period's end 07:00 (70), issued 05:00 (71); w1 withdrawn by its later version
    assert got == [
        ("05:00", 71.0),
        ("07:00", 70.0),
        ("08:00", 80.0),
        ("08:05", 81.0),
        ("08:10", 85.0),
        ("09:00", 95.0),
        ("11:00", 77.0),
    ]
    assert o.loc[o["code"] == "o2_support", "value"].tolist() == [1.0]  # valueBoolean true
    q = res.quarantine.set_index("line")["reason"]
    assert q[3].startswith("status registered") and q[4].startswith("status entered-in-error")
    assert q[5].startswith("status cancelled")
    assert q[7].startswith("superseded by a later version of Observation/v1")
    assert q[9].startswith("superseded") and q[10].startswith("status entered-in-error")
    assert q[14] == "data absent (asked-unknown)"
    assert len(res.quarantine) == 7 and balanced(res.report)
    strict = IngestConfig(missing_consent="include", preliminary="reject")
    res2 = ingest([p], strict, vocab, KEY)
    assert len(res2.observations) == len(res.observations) - 2  # preliminary, unknown refused


def heart_rate_bundle() -> dict:
    """The heart-rate Observations of :func:`fhir_every_status` as one collection Bundle."""
    rs = [r for r in fhir_every_status() if r["code"]["coding"][0]["code"] == "8867-4"]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in rs]}


def test_fhir_service_parser_agrees(vocab):
    """/v1/fhir/score reads the same Bundle with the same rules (ignored = not data)."""
    from serving.fhir import bundle_to_patient

    patient, warnings = bundle_to_patient(heart_rate_bundle(), vocab)
    values = sorted(float(o.value) for o in patient.observations)
    assert values == [70.0, 71.0, 77.0, 80.0, 81.0, 85.0, 95.0]
    assert sum("ignored" in w for w in warnings) == 7


def test_fhir_service_follows_the_projects_preliminary_policy(vocab, tmp_path, monkeypatch):
    """``ingest.preliminary: reject`` in the project's params: the service refuses
    preliminary and unknown Observations as ingest does (warnings, not values)."""
    from serving.config import PARAMS_ENV, ingest_preliminary
    from serving.fhir import bundle_to_patient

    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  preliminary: reject\n")
    monkeypatch.setenv(PARAMS_ENV, str(params))
    patient, warnings = bundle_to_patient(heart_rate_bundle(), vocab)
    assert sorted(float(o.value) for o in patient.observations) == [70.0, 71.0, 77.0, 80.0, 95.0]
    assert sum("preliminary: reject" in w for w in warnings) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  preliminary: sometimes\n")  # a bad policy names its key
    with pytest.raises(UserError, match=r"ingest\.preliminary"):
        ingest_preliminary(bad)


HL7 = (
    "MSH|^~\\&|MONITOR|WARD7|VITALRISK|HOSP|20260105080000||ORU^R01|MSG1|P|2.5\r"
    "PID|1||MRN-000020^^^HOSP^MR||Doe^Jane||19500101|F\r"
    "OBR|1|||vitals|||20260105080000+0000\r"
    "OBX|1|NM|8867-4^Heart rate^LN||88|/min^/min^UCUM|||||F\r"
    "OBX|2|NM|8310-5^Body temperature^LN||100.4|[degF]^F^UCUM|||||F|||20260105081000+0000\r"
    "OBX|3|NM|9279-1^Resp rate^LN||22|/min^/min^UCUM|||||W\r"
    "OBX|4|NM|2708-6^SpO2^LN||||||||X\r"
    "OBX|5|CWE|80288-4^ACVPU^LN||V^Voice^ACVPU||||||P\r"
    "OBX|6|NM|99999-9^Unknown^LN||5|mg|||||F\r"
    "OBX|7|NM|8867-4^Heart rate^LN||900|/min^/min^UCUM|||||F\r"
    "\n"
    "MSH|^~\\&|LAB|HOSP|VITALRISK|HOSP|20260105090000||ADT^A01|MSG2|P|2.5\r"
    "PID|1||MRN-000020^^^HOSP^MR\r"
)


def test_hl7_oru(write, cfg, vocab):
    p = write("feed.hl7", HL7)
    res = ingest([p], cfg, vocab, KEY)
    o = res.observations.astype({"code": str}).set_index("code")
    assert o.loc["heart_rate", "value"] == 88
    assert o.loc["body_temp", "value"] == pytest.approx(38.0)
    assert o.loc["body_temp", "time"] == pd.Timestamp("2026-01-05T08:10:00Z")  # OBX-14
    assert o.loc["heart_rate", "time"] == pd.Timestamp("2026-01-05T08:00:00Z")  # OBR-7
    assert o.loc["consciousness", "value"] == 2  # preliminary accepted by default
    reasons = " | ".join(res.quarantine["reason"])
    assert "OBX-11 status 'W'" in reasons and "data absent" in reasons
    assert "out-of-range value: heart_rate value 900" in reasons
    assert "message type 'ADT^A01' is not ORU^R01" in reasons
    assert res.report["unmapped"] == {"99999-9 (unmapped code)": 1}
    assert res.patients["sex"].tolist() == ["F"]
    assert balanced(res.report)


def test_hl7_corrections_and_withdrawals_replace_the_earlier_result(write, cfg, vocab):
    """OBX-11 C supersedes the earlier result of the same observation; W and D withdraw it;
    a result of another time or sub-id stays."""
    msh = "MSH|^~\\&|MON|W7|VR|H|20260105080000||ORU^R01|M{n}|P|2.5\r"
    pid = "PID|1||MRN-000021^^^HOSP^MR\r"
    obr = "OBR|1|||vitals|||20260105080000+0000\r"

    def obx(code: str, value: str, status: str, sub: str = "", t: str = "") -> str:
        return f"OBX|1|NM|{code}^x^LN|{sub}|{value}|/min|||||{status}|||{t}\r"

    text = (
        msh.format(n=1) + pid + obr
        + obx("8867-4", "88", "F") + obx("9279-1", "30", "F") + obx("9279-1", "14", "F", sub="2")
        + obx("8867-4", "70", "F", t="20260105090000+0000") + "\n"
        + msh.format(n=2) + pid + obr
        + obx("8867-4", "92", "C") + obx("9279-1", "30", "W")
    )  # fmt: skip
    res = ingest([write("corr.hl7", text)], cfg, vocab, KEY)
    o = res.observations.astype({"code": str})
    got = sorted(zip(o["code"], o["time"].dt.strftime("%H:%M"), o["value"], strict=True))
    assert got == [("heart_rate", "08:00", 92.0), ("heart_rate", "09:00", 70.0),
                   ("resp_rate", "08:00", 14.0)]  # fmt: skip
    reasons = res.quarantine["reason"].tolist()
    assert sum(r.startswith("superseded: corrected by OBX-11 C on line") for r in reasons) == 1
    assert sum(r.startswith("superseded: withdrawn as wrong by OBX-11 W") for r in reasons) == 1
    assert balanced(res.report)


PSV_COLUMNS = (
    "HR|O2Sat|Temp|SBP|MAP|DBP|Resp|EtCO2|BaseExcess|HCO3|FiO2|pH|PaCO2|SaO2|AST|BUN|"
    "Alkalinephos|Calcium|Chloride|Creatinine|Bilirubin_direct|Glucose|Lactate|Magnesium|"
    "Phosphate|Potassium|Bilirubin_total|TroponinI|Hct|Hgb|PTT|WBC|Fibrinogen|Platelets|"
    "Age|Gender|Unit1|Unit2|HospAdmTime|ICULOS|SepsisLabel"
)
#: one plausible value per clinical column (34), in the order above
PSV_VALUES = [
    "88",
    "97",
    "37.2",
    "120",
    "85",
    "65",
    "18",
    "35",
    "0",
    "24",
    "0.4",
    "7.4",
    "40",
    "98",
    "30",
    "15",
    "80",
    "9",
    "104",
    "1.1",
    "0.2",
    "110",
    "1.8",
    "2.1",
    "3.5",
    "4.2",
    "0.8",
    "0.02",
    "38",
    "12.5",
    "30",
    "9.5",
    "300",
    "220",
]


def physionet_vocab(tmp_path: Path):
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "physionet2019.yaml").write_text(
        (ROOT / "config/physionet2019.yaml").read_text()
    )
    text = (
        (ROOT / "config/vocabulary.yaml")
        .read_text()
        .replace("include: []", "include: [physionet2019.yaml]")
    )
    (tmp_path / "vocab" / "vocabulary.yaml").write_text(text)
    return load_vocabulary(tmp_path / "vocab" / "vocabulary.yaml")


def write_psv(d: Path, name: str, rows: list[list[str]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.psv").write_text(PSV_COLUMNS + "\n" + "\n".join("|".join(r) for r in rows) + "\n")


def psv_row(
    hour: int, label: int, age: str = "67", gender: str = "1", nan_labs: bool = False
) -> list[str]:
    vals = [v if not (nan_labs and i >= 8) else "NaN" for i, v in enumerate(PSV_VALUES)]
    return [*vals, age, gender, "1", "0", "-2.5", str(hour), str(label)]


def test_physionet_layout_every_column(tmp_path):
    vocab = physionet_vocab(tmp_path)
    d = tmp_path / "training"
    write_psv(d, "p000001", [psv_row(h, int(h >= 3), nan_labs=h > 1) for h in range(1, 6)])
    write_psv(
        d, "p000002", [psv_row(h, 0, age="45", gender="0", nan_labs=True) for h in range(1, 4)]
    )
    cfg = IngestConfig(missing_consent="include")
    res = ingest([d], cfg, vocab, KEY)
    o = res.observations.astype({"code": str})
    first = o[o["time"] == pd.Timestamp("2000-01-01T01:00:00Z")]
    assert first["code"].nunique() == 35  # 34 columns, FiO2 twice (fio2 and o2_support)
    assert res.report["unmapped"] == {}
    assert o["time"].min() == pd.Timestamp("2000-01-01T01:00:00Z")  # relative: epoch + ICULOS
    pats = res.patients.set_index(res.patients["age"])
    assert pats.loc[67.0, "sex"] == "M" and pats.loc[45.0, "sex"] == "F"
    assert (res.patients["setting"] == "icu").all()
    assert pats.loc[67.0, "hosp_adm_hours"] == -2.5 and pats.loc[67.0, "icu_los_hours"] == 5
    # SepsisLabel first 1 at ICULOS 3 -> onset 6 h later (PhysioNet's definition)
    assert res.outcomes[["time", "event"]].values.tolist() == [
        [pd.Timestamp("2000-01-01T09:00:00Z"), "sepsis"]
    ]
    assert balanced(res.report)


def test_psv_unmapped_columns_counted(tmp_path, capsys, monkeypatch):
    """With the default vocabulary, labs it lacks are counted per column, never silent."""
    from pipelines.cli import main

    monkeypatch.setenv("VITALRISK_PSEUDONYM_KEY", "k")
    d = tmp_path / "training"
    write_psv(d, "p000003", [psv_row(h, 0) for h in range(1, 4)])
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  missing_consent: include\n")
    code = main(
        [
            "ingest",
            str(d),
            "--out",
            str(tmp_path / "out"),
            "--params",
            str(params),
            "--vocabulary",
            str(ROOT / "config/vocabulary.yaml"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert report["unmapped"]["etco2 (unmapped code)"] == 3
    assert len(report["unmapped"]) == 23 and balanced(report)
    assert "unmapped (not read" in out and "largest:" in out


def test_psv_bad_cells_found_in_slow_path(tmp_path, vocab):
    d = tmp_path / "psv"
    d.mkdir()
    (d / "p1.psv").write_text("HR|O2Sat|ICULOS\n80|97|1\nfast|96|2\n81|95|3|9\n82|NaN|x\n")
    (d / "p2.psv").write_text("HR|O2Sat|ICULOS\n70|99|1\n71|98|2\n")
    res = ingest([d], IngestConfig(missing_consent="include"), vocab, KEY)
    q = res.quarantine.sort_values("line")
    assert q["reason"].tolist()[0].startswith("unparseable value 'fast' for heart_rate")
    assert any(r.startswith("wrong number of fields") for r in q["reason"])
    assert any("ICULOS is not a non-negative number" in r for r in q["reason"])
    # the file name is the patient id: pseudonymised in the record text too
    assert q["record"].str.match(r"^p_[0-9a-f]{20}\.psv:\d+: ").all(), q["record"].tolist()
    assert len(res.observations) == 4 + 3 and balanced(res.report)  # p2: 4; p1: 80, 97, 96


def test_hostile_directory_tree(tmp_path, cfg, vocab):
    """Loops, links to '.', dangling links, a FIFO and a link out of the tree: named, no hang."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "obs.csv").write_text(
        "patient_id,time,code,value,unit\nMRN-1,2026-01-05T08:00:00Z,heart_rate,80,/min\n"
    )
    os.symlink(d, d / "sub" / "loop")  # a loop back to the root
    os.symlink(".", d / "here1")  # two links to '.'
    os.symlink(".", d / "sub" / "here2")
    os.symlink(d / "missing.csv", d / "dangling.csv")
    os.mkfifo(d / "pipe.csv")  # tests run as root: a FIFO is the unreadable file (open blocks)
    outside = tmp_path / "outside.csv"
    outside.write_text("patient_id,time,code,value\nMRN-9,2026-01-05T08:00:00Z,heart_rate,70\n")
    os.symlink(outside, d / "escape.csv")
    res = ingest([d], cfg, vocab, KEY)
    assert len(res.observations) == 1  # obs.csv read once, the outside file never
    skipped = {Path(x["path"]).name: x["reason"] for x in res.report["skipped_files"]}
    assert skipped["dangling.csv"].startswith("dangling link")
    assert skipped["pipe.csv"] == "a FIFO, not a regular file"
    assert skipped["escape.csv"].startswith("link out of the input tree")
    with pytest.raises(StructuralError, match="dangling link"):
        ingest([d / "dangling.csv"], cfg, vocab, KEY)
    strict = cfg.model_copy(update={"unreadable": "error"})
    with pytest.raises(StructuralError, match=r"dangling\.csv: dangling link"):
        ingest([d], strict, vocab, KEY)
    (d / "dangling.csv").unlink()
    with pytest.raises(StructuralError, match=r"pipe\.csv: a FIFO, not a regular file"):
        ingest([d], strict, vocab, KEY)
