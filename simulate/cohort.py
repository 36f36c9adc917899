"""Synthetic deterioration cohort: ward spot checks and home wearables, written in real formats.

Why synthetic: the demo and the tests need data with an honest, learnable signal (a model on
point-in-time features should beat NEWS2 somewhat, NEWS2 should be informative but imperfect)
and the messiness of real exports (units, gaps, artefacts, bad records), without any patient.

Everything is deterministic for a seed: each patient draws from its own stream
``default_rng([seed, index])`` and files are written with fixed formatting, so regenerating
gives byte-identical files and ``dvc status`` stays clean.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simulate.config import SimulateConfig

logger = logging.getLogger(__name__)

COMORBIDITIES = ("copd", "heart_failure", "diabetes", "ckd", "hypertension")
WARD_EVENTS = (("icu_transfer", 0.45), ("rapid_response", 0.40), ("death", 0.15))
HOME_EVENTS = (("emergency_admission", 0.8), ("death", 0.2))
#: decimals each code is recorded with (canonical unit)
DECIMALS = {
    "heart_rate": 0,
    "resp_rate": 0,
    "spo2": 0,
    "sbp": 0,
    "dbp": 0,
    "body_temp": 1,
    "o2_support": 0,
    "consciousness": 0,
    "steps": 0,
    "sleep_duration": 2,
    "creatinine": 2,
    "lactate": 1,
}
LOINC = {
    "heart_rate": "8867-4",
    "resp_rate": "9279-1",
    "spo2": "59408-5",
    "sbp": "8480-6",
    "dbp": "8462-4",
    "body_temp": "8310-5",
    "o2_support": "3151-8",
    "consciousness": "80288-4",
    "steps": "55423-8",
    "sleep_duration": "93832-4",
    "creatinine": "2160-0",
    "lactate": "2524-7",
}
UNITS = {
    "heart_rate": "/min",
    "resp_rate": "/min",
    "spo2": "%",
    "sbp": "mm[Hg]",
    "dbp": "mm[Hg]",
    "body_temp": "Cel",
    "o2_support": "1",
    "consciousness": "{score}",
    "steps": "{steps}",
    "sleep_duration": "h",
    "creatinine": "mg/dL",
    "lactate": "mmol/L",
}
ACVPU = ("A", "C", "V", "P", "U")
ACVPU_TEXT = ("Alert", "New confusion", "Voice", "Pain", "Unresponsive")
CREATININE_UMOL = 88.4  # umol/L per mg/dL
PSV_COLUMNS = (
    "HR",
    "O2Sat",
    "Temp",
    "SBP",
    "MAP",
    "DBP",
    "Resp",
    "FiO2",
    "Creatinine",
    "Lactate",
    "Age",
    "Gender",
    "ICULOS",
)
WIDE_COLUMNS = ("HR", "SpO2", "Steps", "SleepMin", "SBP", "DBP", "TempF")
TIME_FMT = "%Y-%m-%dT%H:%M:%SZ"
WIDE_TIME_FMT = "%Y-%m-%d %H:%M:%S"  # the wearable export writes naive UTC times


@dataclass
class Cohort:
    """The simulated truth, in canonical units, keyed by raw source ids (``MRN-000123``)."""

    patients: pd.DataFrame
    outcomes: pd.DataFrame
    observations: pd.DataFrame  # patient_id, time (UTC), code, value, source
    snapshot: pd.DataFrame  # one row per patient at admission (the cohort file)


def source_id(index: int) -> str:
    return f"MRN-{index + 1:06d}"


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _shape(kind: str, x: np.ndarray) -> np.ndarray:
    """Prodrome shape on x in [0, 1] (0 = onset, 1 = event)."""
    if kind == "linear":
        return x
    if kind == "convex":
        return np.power(x, 2.5)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-10 * (x - 0.5)))
    return (x > 0.6).astype(float)  # step: abrupt change late in the window


class _Patient:
    """Latent physiology of one patient; ``state(t_hours)`` gives true values at any times."""

    def __init__(self, index: int, cfg: SimulateConfig, t0: pd.Timestamp) -> None:
        rng = np.random.default_rng([cfg.seed, index])
        self.rng = rng
        self.index = index
        self.id = source_id(index)
        self.setting = "home" if rng.random() < cfg.home_fraction else "ward"
        home = self.setting == "home"
        age = float(np.clip(rng.normal(60 if home else 69, 15), 18, 97))
        if cfg.drift == "older":
            age = min(age + 12.0, 99.0)
        self.age = round(age)
        self.sex = "F" if rng.random() < 0.5 else "M"
        a = self.age
        probs = {
            "copd": 0.05 + 0.003 * max(a - 40, 0),
            "heart_failure": 0.02 + 0.004 * max(a - 50, 0),
            "diabetes": 0.18,
            "ckd": 0.03 + 0.003 * max(a - 50, 0),
            "hypertension": 0.15 + 0.006 * max(a - 40, 0),
        }
        u = rng.random(len(COMORBIDITIES))
        self.cm = {k: int(u[i] < probs[k]) for i, k in enumerate(COMORBIDITIES)}
        self.athlete = bool(a < 50 and rng.random() < 0.3)
        self.chronic_confusion = bool(not home and a > 80 and rng.random() < 0.15)
        # baselines
        self.hr0 = (
            rng.uniform(42, 52)
            if self.athlete
            else rng.normal(76, 9) + 5 * self.cm["heart_failure"]
        )
        self.rr0 = rng.normal(15.5, 1.6) + 3 * self.cm["copd"]
        self.spo2_0 = (
            rng.uniform(87, 92)
            if self.cm["copd"] and rng.random() < 0.6
            else min(rng.normal(97, 1.0), 99.3)
        )
        self.sbp0 = float(np.clip(rng.normal(127, 14) + 10 * self.cm["hypertension"], 95, 175))
        self.dbp0 = 0.55 * self.sbp0 + rng.normal(8, 5)
        self.temp0 = rng.normal(36.75, 0.22)
        self.steps0 = float(
            np.exp(rng.normal(math.log(5500), 0.45))
            * (1.6 if self.athlete else 1.0)
            * (1 - 0.006 * max(a - 50, 0))
        )
        self.sleep0 = rng.normal(7.0, 0.7)
        self.wander = rng.normal(0, 1, (5, 2))  # slow multi-day wandering per signal
        self.wander_period = rng.uniform(40, 120, 5)
        # follow-up and events
        self.start = t0 + pd.Timedelta(minutes=int(rng.uniform(0, cfg.enrolment_days * 1440)))
        lo, hi = cfg.followup_days
        self.duration_h = rng.uniform(lo, hi) * 24
        risk = (
            _logit(cfg.event_rate)
            - 0.45
            + 0.035 * (a - 65)
            + 0.6 * self.cm["copd"]
            + 0.7 * self.cm["heart_failure"]
            + 0.5 * self.cm["ckd"]
            + 0.2 * self.cm["diabetes"]
        )
        self.event: str | None = None
        self.event_h = math.inf
        u_event, u_type, u_time = rng.random(3)
        if u_event < 1 / (1 + math.exp(-risk)):
            choices = HOME_EVENTS if home else WARD_EVENTS
            acc = 0.0
            for name, w in choices:
                acc += w
                if u_type <= acc:
                    self.event = name
                    break
            self.event = self.event or choices[-1][0]
            self.event_h = 24 + u_time * (self.duration_h - 24)
            self.duration_h = self.event_h
        silent = rng.random() < cfg.silent_event_fraction
        self.strength = 0.0 if silent or self.event is None else rng.uniform(0.5, 1.3)
        self.prodrome_h = rng.uniform(6, 72)
        self.shape = str(rng.choice(["linear", "convex", "sigmoid", "step"]))
        self.infection = bool(rng.random() < 0.55)
        # benign transient episode (post-op fever, pain, anxiety): alarming but harmless
        self.bump_strength = rng.uniform(0.15, 0.45) if rng.random() < 0.2 else 0.0
        self.bump_center = rng.uniform(0.1, 0.9) * self.duration_h
        self.bump_width = rng.uniform(6, 36)
        c_frac, m_frac = rng.random(2)
        self.consent_care = True
        self.consent_model_training = bool(c_frac < cfg.consent_model_training)
        self.consent_research = bool(m_frac < cfg.consent_research)
        self.has_labs = bool(not home and rng.random() < 0.45)
        self.ltot = bool(self.cm["copd"] and rng.random() < 0.3)

    # -- latent trajectories -------------------------------------------------------------
    def severity(self, th: np.ndarray) -> np.ndarray:
        x = np.clip((th - (self.event_h - self.prodrome_h)) / self.prodrome_h, 0, 1)
        sev = self.strength * _shape(self.shape, x) if self.strength > 0 else np.zeros_like(th)
        if self.bump_strength > 0:
            z = (th - self.bump_center) / (self.bump_width / 2)
            sev = sev + self.bump_strength * np.where(
                np.abs(z) < 1, np.cos(z * math.pi / 2) ** 2, 0
            )
        return sev

    def state(self, th: np.ndarray) -> dict[str, np.ndarray]:
        hour = (self.start.hour + self.start.minute / 60 + th) % 24
        circ = np.cos(2 * math.pi * (hour - 16) / 24)
        abs_h = th
        wand = [
            self.wander[i, 0]
            * np.sin(2 * math.pi * abs_h / self.wander_period[i] + self.wander[i, 1])
            for i in range(5)
        ]
        sev = self.severity(th)
        temp_gain = 1.6 if self.infection else 0.3
        return {
            "heart_rate": self.hr0 + 4 * circ + 3 * wand[0] + 28 * sev,
            "resp_rate": self.rr0 + 0.5 * circ + 0.8 * wand[1] + 9 * sev,
            "spo2": self.spo2_0 + 0.6 * wand[2] - 7 * sev,
            "sbp": self.sbp0 + 5 * circ + 5 * wand[3] - 26 * sev,
            "body_temp": self.temp0 + 0.25 * circ + 0.1 * wand[4] + temp_gain * sev,
            "severity": sev,
            "hour": hour,
        }


def _round(code: str, v: np.ndarray) -> np.ndarray:
    return np.round(v, DECIMALS[code])


def _ward_obs(p: _Patient) -> list[tuple[np.ndarray, str, np.ndarray]]:
    rng = p.rng
    times: list[float] = []
    t = rng.uniform(0, 1.0)
    base = rng.uniform(3, 7)
    while t < p.duration_h:
        times.append(t)
        sev_now = float(p.severity(np.array([t]))[0])
        # escalation: sicker patients are checked more often (informative sampling)
        t += rng.uniform(0.75, 2.0) if sev_now > 0.4 else rng.uniform(base - 1, base + 1)
    th = np.array(times)
    n = len(th)
    s = p.state(th)
    out: list[tuple[np.ndarray, str, np.ndarray]] = []
    hr = s["heart_rate"] + rng.normal(0, 3, n)
    rr = s["resp_rate"] + rng.normal(0, 1.2, n)
    spo2_true = s["spo2"]
    threshold = 88 if p.cm["copd"] else 92
    # oxygen is started below the target range and weaned once saturation recovers;
    # some COPD patients are on long-term oxygen (alarming on NEWS2, benign)
    o2 = (spo2_true < threshold + rng.normal(0, 0.7, n)).astype(float)
    if p.ltot:
        o2[:] = 1.0
    spo2 = np.minimum(spo2_true + 3.5 * o2 * (spo2_true < 95) + rng.normal(0, 0.8, n), 100)
    sbp = s["sbp"] + rng.normal(0, 5, n)
    dbp = p.dbp0 + 0.5 * (s["sbp"] - p.sbp0) + rng.normal(0, 4, n)
    temp = s["body_temp"] + rng.normal(0, 0.12, n)
    sev = s["severity"]
    p_conf = np.clip(0.9 * (sev - 0.55), 0, 0.9)
    conf = np.where(rng.random(n) < p_conf, rng.choice([1, 1, 1, 2, 2, 3, 4], n), 0)
    if p.chronic_confusion:
        conf = np.maximum(conf, (rng.random(n) < 0.7).astype(int))
    miss = rng.random((n, 4))
    for code, vals, keep in (
        ("heart_rate", hr, np.ones(n, bool)),
        ("resp_rate", rr, miss[:, 0] > 0.03),
        ("spo2", spo2, np.ones(n, bool)),
        ("o2_support", o2, miss[:, 1] > 0.05),
        ("sbp", sbp, miss[:, 2] > 0.04),
        ("dbp", dbp, miss[:, 2] > 0.04),
        ("body_temp", temp, miss[:, 3] > 0.15),
        ("consciousness", conf.astype(float), miss[:, 1] > 0.08),
    ):
        out.append((th[keep], code, _round(code, vals[keep])))
    if p.has_labs:
        days = np.arange(math.ceil(p.duration_h / 24) + 1)
        lt = days * 24 + ((6 - p.start.hour) % 24) + rng.uniform(-0.5, 0.5, len(days))
        lt = lt[(lt >= 0) & (lt < p.duration_h)]
        if len(lt):
            ls = p.severity(lt)
            cr = (
                (2.1 if p.cm["ckd"] else 0.9)
                * (1 + 0.7 * ls)
                * np.exp(rng.normal(0, 0.08, len(lt)))
            )
            la = (
                1.0
                + 3.2 * ls * (1.0 if p.infection else 0.6)
                + np.abs(rng.normal(0, 0.25, len(lt)))
            )
            out.append((lt, "creatinine", _round("creatinine", cr)))
            out.append((lt, "lactate", _round("lactate", la)))
    return out


def _home_obs(p: _Patient, cfg: SimulateConfig) -> list[tuple[np.ndarray, str, np.ndarray]]:
    rng = p.rng
    k = int(
        rng.choice(
            cfg.wearable_intervals_min,
            p=np.array(cfg.wearable_interval_weights) / sum(cfg.wearable_interval_weights),
        )
    )
    th = np.arange(0, p.duration_h * 60, k, dtype=float) / 60 + rng.uniform(0, k / 60)
    th = th[th < p.duration_h]
    # device gaps: charging / not worn, ~1.3 per day, mean 2 h
    n_gaps = rng.poisson(1.3 * p.duration_h / 24)
    g0 = rng.uniform(0, p.duration_h, n_gaps)
    g1 = g0 + rng.exponential(2.0, n_gaps)
    worn = np.ones(len(th), bool)
    for a, b in zip(g0, g1, strict=True):
        worn &= ~((th >= a) & (th < b))
    th = th[worn]
    n = len(th)
    s = p.state(th)
    sev = s["severity"]
    hour = s["hour"]
    awake = (hour >= 7) & (hour < 22.5)
    # hourly steps drive activity HR; deterioration cuts activity
    hours = np.arange(0, math.floor(p.duration_h))
    hh = (p.start.hour + hours) % 24
    day_shape = np.where((hh >= 7) & (hh < 22), 1.0 + 0.6 * np.sin(math.pi * (hh - 7) / 15), 0.02)
    hsev = p.severity(hours + 0.5)
    steps_h = (
        p.steps0
        / 16
        * day_shape
        * (1 - 0.75 * np.clip(hsev, 0, 1))
        * np.exp(rng.normal(0, 0.6, len(hours)))
    )
    hidx = np.minimum(th.astype(int), len(hours) - 1) if len(hours) else np.zeros(n, int)
    act = steps_h[hidx] / 45 if len(hours) else np.zeros(n)
    # at home the resting-HR rise is milder than on the ward (earlier in the illness)
    hr = (
        s["heart_rate"]
        - 10 * sev
        - 6 * (~awake)
        + act * rng.uniform(0.3, 1.3, n)
        + rng.normal(0, 2.5, n)
    )
    spikes = rng.random(n) < 0.004  # motion artefact
    hr = hr + spikes * rng.uniform(40, 80, n)
    if cfg.drift == "hr_offset":
        hr = hr + cfg.hr_offset_bpm  # the new wearable firmware reads high (3 bpm default)
    spo2_every = 3
    sp_sel = (np.arange(n) % spo2_every) == 0
    spo2 = np.minimum(s["spo2"] + 2.5 * sev + rng.normal(0, 1.3, n), 100)
    drop = rng.random(n) < 0.01  # SpO2 drop-out artefact
    spo2 = np.where(drop, rng.uniform(70, 86, n), spo2)
    if cfg.drift == "spo2_missing":
        sp_sel &= rng.random(n) < 0.4
    else:
        rng.random(n)
    out = [
        (th, "heart_rate", _round("heart_rate", hr)),
        (th[sp_sel], "spo2", _round("spo2", spo2[sp_sel])),
    ]
    keep_h = steps_h > 0.5
    worn_h = np.ones(len(hours), bool)
    for a, b in zip(g0, g1, strict=True):
        worn_h &= ~((hours + 1 > a) & (hours < b))
    keep_h &= worn_h
    out.append((hours[keep_h] + 1.0, "steps", _round("steps", steps_h[keep_h])))
    # nightly sleep, recorded at wake-up (07:00 local = UTC here)
    wake = np.arange(0, math.ceil(p.duration_h / 24) + 1) * 24 + ((7 - p.start.hour) % 24)
    wake = wake[(wake > 6) & (wake < p.duration_h)]
    if len(wake):
        wsev = p.severity(wake - 4)
        sleep = np.clip(p.sleep0 - 2.3 * wsev + rng.normal(0, 0.6, len(wake)), 1.5, 11)
        out.append((wake, "sleep_duration", _round("sleep_duration", sleep)))
    # BP and temperature once or twice daily
    days = np.arange(0, math.ceil(p.duration_h / 24) + 1) * 24
    morning = days + ((8 - p.start.hour) % 24) + rng.uniform(-1, 1, len(days))
    evening = days + ((20 - p.start.hour) % 24) + rng.uniform(-1, 1, len(days))
    bt = np.sort(
        np.concatenate(
            [morning[rng.random(len(days)) < 0.85], evening[rng.random(len(days)) < 0.5]]
        )
    )
    bt = bt[(bt >= 0) & (bt < p.duration_h)]
    if len(bt):
        bs = p.state(bt)
        m = len(bt)
        sbp = bs["sbp"] + rng.normal(0, 6, m)
        dbp = p.dbp0 + 0.5 * (bs["sbp"] - p.sbp0) + rng.normal(0, 5, m)
        temp = bs["body_temp"] + rng.normal(0, 0.15, m)
        out += [
            (bt, "sbp", _round("sbp", sbp)),
            (bt, "dbp", _round("dbp", dbp)),
            (bt, "body_temp", _round("body_temp", temp)),
        ]
    return out


def simulate_cohort(cfg: SimulateConfig) -> Cohort:
    """Simulate the cohort in memory (canonical units, raw source ids)."""
    t0 = (
        pd.Timestamp(cfg.start).tz_convert("UTC")
        if pd.Timestamp(cfg.start).tzinfo
        else pd.Timestamp(cfg.start, tz="UTC")
    )
    prows, orows, snaps, frames = [], [], [], []
    for i in range(cfg.n_patients):
        p = _Patient(i, cfg, t0)
        home = p.setting == "home"
        parts = _home_obs(p, cfg) if home else _ward_obs(p)
        start_ns = p.start.value
        for th, code, vals in parts:
            if len(th) == 0:
                continue
            secs = np.round(th * 3600 / 60) * 60  # record to the minute
            frames.append(
                pd.DataFrame(
                    {
                        "pidx": i,
                        "time": pd.to_datetime(start_ns + (secs * 1e9).astype("int64"), utc=True),
                        "code": code,
                        "value": vals.astype(float),
                        "source": (
                            "wearable"
                            if code in ("heart_rate", "spo2", "steps", "sleep_duration")
                            else "home"
                        )
                        if home
                        else ("lab" if code in ("creatinine", "lactate") else "ward"),
                    }
                )
            )
        end = p.start + pd.Timedelta(minutes=round(p.duration_h * 60))
        u = p.rng.random(3)
        if home:
            system = "wide_csv" if u[0] < cfg.home_wide_fraction else "home_csv"
        else:
            system = (
                "fhir"
                if u[0] < cfg.ward_fhir_fraction
                else (
                    "psv" if u[0] < cfg.ward_fhir_fraction + cfg.ward_psv_fraction else "ward_csv"
                )
            )
        prows.append(
            {
                "patient_id": p.id,
                "setting": p.setting,
                "age": p.age,
                "sex": p.sex,
                **{f"cm_{k}": v for k, v in p.cm.items()},
                "followup_start": p.start,
                "followup_end": end,
                "consent_care": p.consent_care,
                "consent_model_training": p.consent_model_training,
                "consent_research": p.consent_research,
                "source_system": system,
                "_loinc": bool(u[1] < 0.3),
                "_fahrenheit": bool(u[2] < 0.1),
                "_kpa": bool(u[2] > 0.97),
            }
        )
        if p.event is not None:
            orows.append({"patient_id": p.id, "time": end, "event": p.event})
        s0 = p.state(np.array([0.0]))
        snaps.append(
            {
                "patient_id": p.id,
                "index_time": p.start,
                "heart_rate": round(float(s0["heart_rate"][0] + p.rng.normal(0, 3))),
                "resp_rate": None
                if home
                else round(float(s0["resp_rate"][0] + p.rng.normal(0, 1.2))),
                "spo2": round(float(min(s0["spo2"][0] + p.rng.normal(0, 0.8), 100))),
                "sbp": round(float(s0["sbp"][0] + p.rng.normal(0, 5))),
                "dbp": round(float(p.dbp0 + p.rng.normal(0, 4))),
                "body_temp": round(float(s0["body_temp"][0] + p.rng.normal(0, 0.12)), 1),
                "creatinine": round(
                    (2.1 if p.cm["ckd"] else 0.9) * float(np.exp(p.rng.normal(0, 0.08))), 2
                )
                if p.has_labs
                else None,
                "lactate": round(1.0 + abs(float(p.rng.normal(0, 0.25))), 1)
                if p.has_labs
                else None,
                "event": p.event or "",
                "time_to_event_h": round(p.duration_h, 2),
                "event_observed": int(p.event is not None),
            }
        )
    patients = pd.DataFrame(prows)
    obs = pd.concat(frames, ignore_index=True)
    obs["patient_id"] = patients["patient_id"].to_numpy()[obs["pidx"].to_numpy()]
    obs = (
        obs.drop(columns="pidx")
        .sort_values(["patient_id", "time", "code"], kind="stable")
        .reset_index(drop=True)
    )
    outcomes = pd.DataFrame(orows, columns=["patient_id", "time", "event"])
    return Cohort(
        patients=patients, outcomes=outcomes, observations=obs, snapshot=pd.DataFrame(snaps)
    )


# -- writers -------------------------------------------------------------------------------


def _fmt_time(t: pd.Series, fmt: str = TIME_FMT) -> pd.Series:
    """ISO text, vectorised in numpy (``dt.strftime`` is the simulator's slowest step)."""
    if fmt not in (TIME_FMT, WIDE_TIME_FMT):
        return t.dt.strftime(fmt)
    naive = t.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[s]")
    text = np.datetime_as_string(naive, unit="s").astype(object)
    if len(text) == 0:
        return pd.Series([], index=t.index, dtype=object)
    if fmt == TIME_FMT:
        return pd.Series(text + "Z", index=t.index)
    return pd.Series(np.char.replace(text.astype(str), "T", " ").astype(object), index=t.index)


def _fmt_values(values: pd.Series, codes: pd.Series) -> pd.Series:
    """Fixed decimals per code so that files are byte-for-byte reproducible."""
    out = pd.Series("", index=values.index, dtype=object)
    for code, idx in codes.groupby(codes, sort=True).groups.items():
        d = DECIMALS.get(str(code), 2)
        out.loc[idx] = _fmt_fixed(values.loc[idx].to_numpy(dtype=float), d)
    return out


def _fmt_fixed(v: np.ndarray, d: int) -> np.ndarray:
    """Same text as ``f"{x:.{d}f}"``, vectorised (whole numbers via int64)."""
    if d == 0:
        return np.round(v).astype(np.int64).astype(str).astype(object)
    return np.char.mod(f"%.{d}f", v).astype(object)


def _inject_long(
    df: pd.DataFrame, rng: np.random.Generator, rate: float, dup_rate: float
) -> tuple[pd.DataFrame, list[int]]:
    """Corrupt a few rows of a long string frame the way real exports are corrupt.

    Returns the frame (with duplicates inserted) and the positions of lines to write in Latin-1.
    """
    n = len(df)
    if n == 0:
        return df, []
    k = max(int(n * rate), 6)
    pos = rng.choice(n, size=min(k, n), replace=False)
    kinds = ["bad_time", "unknown_code", "impossible", "missing", "bad_unit", "bad_time2"]
    df = df.copy()
    latin1: list[int] = []
    for j, p_ in enumerate(pos):
        kind = kinds[j % len(kinds)]
        if kind == "bad_time":
            df.iat[p_, 1] = "2026-02-30T25:61:00Z"
        elif kind == "bad_time2":
            df.iat[p_, 1] = "yesterday"
        elif kind == "unknown_code":
            df.iat[p_, 2] = "9999-9" if j % 2 else "blood_glucose_meter_x"
        elif kind == "impossible":
            code = df.iat[p_, 2]
            df.iat[p_, 3] = "999" if code not in ("body_temp", "8310-5") else "3.7"
        elif kind == "missing":
            df.iat[p_, 3] = ""
        elif kind == "bad_unit":
            df.iat[p_, 4] = "furlongs/fortnight"
    # exact duplicates: the same record exported twice
    nd = int(n * dup_rate)
    dpos = np.sort(rng.choice(n, size=min(nd, n), replace=False))
    if nd:
        df = pd.concat([df, df.iloc[dpos]]).sort_index(kind="stable").reset_index(drop=True)
    # one line in Latin-1 (an exported comment field / unit with a micro sign)
    if "unit" in df.columns:
        cand = np.flatnonzero(df["unit"].to_numpy() == "umol/L")
        if len(cand):
            q = int(cand[0])
            df.iat[q, 4] = "µmol/L"
            latin1.append(q)
    return df, latin1


def _write_csv(df: pd.DataFrame, path: Path, latin1_rows: list[int] | None = None) -> None:
    text = df.to_csv(index=False, lineterminator="\n")
    data = text.encode("utf-8")
    if latin1_rows:
        lines = text.split("\n")
        enc = [ln.encode("utf-8") for ln in lines]
        for r in latin1_rows:
            enc[r + 1] = lines[r + 1].encode("latin-1")
        data = b"\n".join(enc)
    path.write_bytes(data)


def _long_frame(obs: pd.DataFrame, pat: pd.DataFrame) -> pd.DataFrame:
    """Raw long CSV view: codes as keys or LOINC, site-specific units and text values."""
    flags = pat.set_index("patient_id")
    loinc = flags.loc[obs["patient_id"], "_loinc"].to_numpy()
    fahr = flags.loc[obs["patient_id"], "_fahrenheit"].to_numpy()
    kpa = flags.loc[obs["patient_id"], "_kpa"].to_numpy()
    code = obs["code"]
    value = obs["value"].astype(float).copy()
    unit = code.map(UNITS).astype(object)
    vtext = _fmt_values(value, code)
    m = (code == "body_temp").to_numpy() & fahr
    vtext[m] = (value[m] * 9 / 5 + 32).map(lambda v: f"{v:.1f}")
    unit[m] = "[degF]"
    m = code.isin(["sbp", "dbp"]).to_numpy() & kpa
    vtext[m] = (value[m] / 7.50062).map(lambda v: f"{v:.2f}")
    unit[m] = "kPa"
    m = (code == "creatinine").to_numpy()
    vtext[m] = (value[m] * CREATININE_UMOL).map(lambda v: f"{v:.0f}")
    unit[m] = "umol/L"
    m = (code == "consciousness").to_numpy()
    vtext[m] = value[m].astype(int).map(lambda v: ACVPU[v])
    unit[m] = ""
    m = (code == "o2_support").to_numpy()
    vtext[m] = value[m].map(lambda v: "oxygen" if v > 0 else "room air")
    unit[m] = ""
    codes_out = code.where(~loinc, code.map(LOINC))
    return pd.DataFrame(
        {
            "patient_id": obs["patient_id"].to_numpy(),
            "time": _fmt_time(obs["time"]).to_numpy(),
            "code": codes_out.to_numpy(),
            "value": vtext.to_numpy(),
            "unit": unit.to_numpy(),
            "source": obs["source"].to_numpy(),
        }
    )


def _wide_frame(obs: pd.DataFrame, rng: np.random.Generator, rate: float) -> pd.DataFrame:
    """Wearable export: one row per (patient, minute), °F and sleep minutes, naive UTC times."""
    col = {
        "heart_rate": "HR",
        "spo2": "SpO2",
        "steps": "Steps",
        "sleep_duration": "SleepMin",
        "sbp": "SBP",
        "dbp": "DBP",
        "body_temp": "TempF",
    }
    o = obs[obs["code"].isin(list(col))].copy()
    v = o["value"].astype(float)
    text = _fmt_values(v, o["code"])
    m = (o["code"] == "body_temp").to_numpy()
    text[m] = (v[m] * 9 / 5 + 32).map(lambda x: f"{x:.1f}")
    m = (o["code"] == "sleep_duration").to_numpy()
    text[m] = (v[m] * 60).map(lambda x: f"{x:.0f}")
    o["text"] = text
    o["col"] = o["code"].map(col)
    wide = o.pivot_table(index=["patient_id", "time"], columns="col", values="text", aggfunc="last")
    wide = wide.reindex(columns=list(WIDE_COLUMNS)).fillna("").reset_index()
    wide["time"] = _fmt_time(wide["time"], WIDE_TIME_FMT)
    wide.columns.name = None
    n = len(wide)
    k = max(int(n * rate), 4)
    pos = rng.choice(n, size=min(k, n), replace=False)
    for j, p_ in enumerate(pos):
        kind = j % 4
        if kind == 0:
            wide.iat[p_, 1] = "31/02/2026 07:00"
        elif kind == 1:
            wide.loc[p_, "HR"] = "0"  # sensor error code, impossible
        elif kind == 2:
            wide.loc[p_, "SpO2"] = "127"  # firmware sentinel, impossible
        else:
            wide.iat[p_, 0] = ""
    return wide


def _fhir_resources(
    obs: pd.DataFrame, pat: pd.DataFrame, rng: np.random.Generator, rate: float
) -> tuple[list[str], list[str]]:
    """Bulk-export ndjson lines: Patient and LOINC-coded Observation resources (R4)."""
    cat = {
        "vital": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "lab": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
    }
    ucum = "http://unitsofmeasure.org"
    patients = []
    for r in pat.itertuples(index=False):
        birth = int(r.followup_start.year) - int(r.age)
        patients.append(
            json.dumps(
                {
                    "resourceType": "Patient",
                    "id": r.patient_id,
                    "identifier": [
                        {"system": "urn:oid:2.16.840.1.113883.2.1.4.1", "value": r.patient_id}
                    ],
                    "gender": "female" if r.sex == "F" else "male",
                    "birthDate": f"{birth}-07-01",
                },
                separators=(",", ":"),
            )
        )
    lines: list[str] = []
    o = obs.copy()
    o["t"] = _fmt_time(o["time"])
    bp = o[o["code"].isin(["sbp", "dbp"])].pivot_table(
        index=["patient_id", "t"], columns="code", values="value", aggfunc="last"
    )
    rest = o[~o["code"].isin(["sbp", "dbp"])]
    items: list[tuple[str, str, int, dict]] = []
    for r in rest.itertuples(index=False):
        code = str(r.code)
        res: dict = {
            "resourceType": "Observation",
            "status": "final",
            "category": cat["lab" if code in ("creatinine", "lactate") else "vital"],
        }
        res["code"] = {"coding": [{"system": "http://loinc.org", "code": LOINC[code]}]}
        res["subject"] = {"reference": f"Patient/{r.patient_id}"}
        res["effectiveDateTime"] = r.t
        v = float(r.value)
        if code == "consciousness":
            res["valueCodeableConcept"] = {
                "coding": [{"system": "http://vitalrisk.example/acvpu", "code": ACVPU[int(v)]}],
                "text": ACVPU_TEXT[int(v)],
            }
        elif code == "o2_support":
            res["valueQuantity"] = {
                "value": 2 if v > 0 else 0,
                "unit": "L/min",
                "system": ucum,
                "code": "L/min",
            }
        elif code == "creatinine":
            res["valueQuantity"] = {
                "value": round(v * CREATININE_UMOL),
                "unit": "umol/L",
                "system": ucum,
                "code": "umol/L",
            }
        else:
            d = DECIMALS[code]
            res["valueQuantity"] = {
                "value": round(v, d) if d else round(v),
                "unit": UNITS[code],
                "system": ucum,
                "code": UNITS[code],
            }
        items.append((str(r.patient_id), r.t, 1, res))
    for (pid, t), row in bp.iterrows():
        comps = []
        for c in ("sbp", "dbp"):
            if not math.isnan(row.get(c, math.nan)):
                comps.append(
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": LOINC[c]}]},
                        "valueQuantity": {
                            "value": round(row[c]),
                            "unit": "mm[Hg]",
                            "system": ucum,
                            "code": "mm[Hg]",
                        },
                    }
                )
        res = {
            "resourceType": "Observation",
            "status": "final",
            "category": cat["vital"],
            "code": {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": "85354-9",
                        "display": "Blood pressure panel",
                    }
                ]
            },
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": t,
            "component": comps,
        }
        items.append((str(pid), str(t), 0, res))
    items.sort(key=lambda x: (x[0], x[1], x[2], x[3]["code"]["coding"][0]["code"]))
    n = len(items)
    bad = (
        set(rng.choice(n, size=min(max(int(n * rate), 4), n), replace=False).tolist())
        if n
        else set()
    )
    for j, (_, _, _, res) in enumerate(items):
        res = {
            "resourceType": "Observation",
            "id": f"obs-{j + 1:07d}",
            **{k: v for k, v in res.items() if k != "resourceType"},
        }
        line = json.dumps(res, separators=(",", ":"))
        if j in bad:
            kind = j % 4
            if kind == 0:
                line = line[: len(line) // 2]  # truncated line: broken JSON
            elif kind == 1:
                res["code"] = {"coding": [{"system": "http://loinc.org", "code": "99999-0"}]}
                line = json.dumps(res, separators=(",", ":"))
            elif kind == 2:
                res.pop("valueQuantity", None)
                res.pop("valueCodeableConcept", None)
                res.pop("component", None)
                line = json.dumps(res, separators=(",", ":"))
            elif "valueQuantity" in res:
                res["valueQuantity"]["code"] = res["valueQuantity"]["unit"] = "parsecs"
                line = json.dumps(res, separators=(",", ":"))
            else:
                line = line[: len(line) - 3]
        lines.append(line)
    return patients, lines


def _write_psv(
    obs: pd.DataFrame, pat: pd.DataFrame, out: Path, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """PhysioNet-2019-style: one pipe-separated file per patient, hourly rows, NaN gaps."""
    out.mkdir(parents=True, exist_ok=True)
    col = {
        "heart_rate": "HR",
        "spo2": "O2Sat",
        "body_temp": "Temp",
        "sbp": "SBP",
        "dbp": "DBP",
        "resp_rate": "Resp",
        "creatinine": "Creatinine",
        "lactate": "Lactate",
        "o2_support": "FiO2",
    }
    anchors = []
    info = pat.set_index("patient_id")
    for pid, g in obs.groupby("patient_id", sort=True):
        start = info.loc[pid, "followup_start"]
        anchor = start.floor("h")
        end_h = math.ceil((info.loc[pid, "followup_end"] - anchor) / pd.Timedelta(hours=1))
        g = g[g["code"].isin(list(col))]
        hour = np.maximum(np.round((g["time"] - anchor) / pd.Timedelta(hours=1)).astype(int), 1)
        grid = pd.DataFrame(
            index=pd.RangeIndex(
                1, max(end_h, int(hour.max()) if len(hour) else 1) + 1, name="ICULOS"
            )
        )
        gg = g.assign(h=hour.to_numpy(), c=g["code"].map(col))
        piv = gg.pivot_table(index="h", columns="c", values="value", aggfunc="last")
        table = pd.DataFrame("NaN", index=grid.index, columns=list(PSV_COLUMNS))
        for c in piv.columns:
            code = next(k for k, v in col.items() if v == c)
            vals = piv[c].dropna()
            if c == "FiO2":
                text = vals.map(lambda v: "0.28" if v > 0 else "0.21")
            else:
                d = DECIMALS[code]
                text = vals.map(lambda v, d=d: f"{v:.{d}f}")
            table.loc[vals.index, c] = text
        if len(piv):
            both = piv.reindex(columns=["SBP", "DBP"]).dropna()
            table.loc[both.index, "MAP"] = ((both["SBP"] + 2 * both["DBP"]) / 3).map(
                lambda v: f"{v:.1f}"
            )
        # sensor artefact: an impossible zero heart rate now and then
        hr_rows = np.flatnonzero(table["HR"].to_numpy() != "NaN")
        if len(hr_rows) and rng.random() < 0.3:
            table.iat[int(rng.choice(hr_rows)), 0] = "0"
        table["Age"] = str(int(info.loc[pid, "age"]))
        table["Gender"] = "0" if info.loc[pid, "sex"] == "F" else "1"
        table["ICULOS"] = table.index.astype(str)
        (out / f"{pid}.psv").write_text(
            table.to_csv(sep="|", index=False, lineterminator="\n"), encoding="utf-8"
        )
        anchors.append((str(pid), anchor.strftime(TIME_FMT)))
    return anchors


def write_cohort(cohort: Cohort, out: Path, cfg: SimulateConfig) -> dict[str, int]:
    """Write every file of the raw cohort into ``out``; returns file -> size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 10**9])
    pat = cohort.patients
    obs = cohort.observations
    system = pat.set_index("patient_id")["source_system"]
    obs_sys = system.loc[obs["patient_id"]].to_numpy()
    # patients and outcomes
    pcols = [
        "patient_id",
        "setting",
        "age",
        "sex",
        *[f"cm_{c}" for c in COMORBIDITIES],
        "followup_start",
        "followup_end",
        "consent_care",
        "consent_model_training",
        "consent_research",
        "source_system",
    ]
    p_out = pat[pcols].copy()
    for c in ("followup_start", "followup_end"):
        p_out[c] = _fmt_time(p_out[c])
    for c in ("consent_care", "consent_model_training", "consent_research"):
        p_out[c] = p_out[c].map({True: "true", False: "false"})
    _write_csv(p_out, out / "patients.csv")
    o_out = cohort.outcomes.copy()
    o_out["time"] = _fmt_time(o_out["time"]) if len(o_out) else o_out["time"]
    _write_csv(o_out, out / "outcomes.csv")
    # long CSVs: ward EHR export and home hub export
    for name, sys_name in (
        ("ward_observations.csv", "ward_csv"),
        ("home_observations.csv", "home_csv"),
    ):
        sub = obs[obs_sys == sys_name].reset_index(drop=True)
        long = _long_frame(sub, pat)
        long, latin1 = _inject_long(long, rng, cfg.bad_record_rate, cfg.duplicate_rate)
        _write_csv(long, out / name, latin1)
    # wide wearable CSV
    sub = obs[obs_sys == "wide_csv"].reset_index(drop=True)
    _write_csv(_wide_frame(sub, rng, cfg.bad_record_rate), out / "wearable_wide.csv")
    # FHIR bulk export
    fdir = out / "fhir"
    fdir.mkdir(exist_ok=True)
    fpat = pat[pat["source_system"] == "fhir"]
    sub = obs[obs_sys == "fhir"].reset_index(drop=True)
    plines, olines = _fhir_resources(sub, fpat, rng, cfg.bad_record_rate)
    (fdir / "Patient.ndjson").write_text("".join(x + "\n" for x in plines), encoding="utf-8")
    (fdir / "Observation.ndjson").write_text("".join(x + "\n" for x in olines), encoding="utf-8")
    # PhysioNet-style PSV directory + time anchors
    pdir = out / "psv"
    sub = obs[obs_sys == "psv"].reset_index(drop=True)
    anchors = _write_psv(sub, pat[pat["source_system"] == "psv"], pdir, rng)
    pd.DataFrame(anchors, columns=["patient_file", "anchor_time"]).to_csv(
        pdir / "anchors.csv", index=False, lineterminator="\n"
    )
    # one-row-per-patient cohort file
    snap = cohort.snapshot.merge(
        pat[["patient_id", "setting", "age", "sex", *[f"cm_{c}" for c in COMORBIDITIES]]],
        on="patient_id",
    )
    snap["index_time"] = _fmt_time(snap["index_time"])
    cols = [
        "patient_id",
        "index_time",
        "setting",
        "age",
        "sex",
        *[f"cm_{c}" for c in COMORBIDITIES],
        "heart_rate",
        "resp_rate",
        "spo2",
        "sbp",
        "dbp",
        "body_temp",
        "creatinine",
        "lactate",
        "event",
        "time_to_event_h",
        "event_observed",
    ]
    snap = snap[cols]
    for c in ("resp_rate", "creatinine", "lactate"):
        snap[c] = snap[c].map(
            lambda v, c=c: (
                ""
                if v is None or (isinstance(v, float) and math.isnan(v))
                else (
                    f"{v:.2f}"
                    if c == "creatinine"
                    else (f"{v:.1f}" if c == "lactate" else f"{int(v)}")
                )
            )
        )
    snap["time_to_event_h"] = snap["time_to_event_h"].map(lambda v: f"{v:.2f}")
    _write_csv(snap, out / "cohort.csv")
    sizes = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    logger.info("wrote %d files, %.1f MB into %s", len(sizes), sum(sizes.values()) / 1e6, out)
    return sizes
