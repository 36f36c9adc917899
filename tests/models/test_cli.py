"""The train -> evaluate -> register -> summary stages through the real CLI on tiny data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.cli import main
from tests.models.conftest import make_frame

PARAMS = {
    "features": {},
    "train": {
        "cv_folds": 2,
        "n_estimators": 150,
        "monotone_constraints": {"news2_total": 1},
        "tuning": {"enabled": True, "n_trials": 2, "timeout_seconds": 60},
    },
    "evaluate": {"bootstrap_reps": 20, "subgroup_bootstrap_reps": 10},
    "register": {"model_name": "vr-cli", "max_calibration_slope_error": 1.0},
}


@pytest.fixture
def workdir(mlflow_env, monkeypatch):
    monkeypatch.chdir(mlflow_env)
    feats = mlflow_env / "artifacts" / "features"
    feats.mkdir(parents=True)
    frame = make_frame(n_patients=250, seed=3)
    frame.to_parquet(feats / "features.parquet")
    (feats / "feature_dictionary.json").write_text(
        json.dumps({"features": [{"name": c} for c in frame.columns[4:]], "label": {}})
    )
    patients = frame[["patient_id"]].drop_duplicates().assign(consent_model_training=True)
    patients.iloc[:3, 1] = False
    patients.to_parquet(mlflow_env / "patients.parquet")
    (mlflow_env / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return mlflow_env


def test_stages_end_to_end(workdir, capsys):
    F = "artifacts/features/features.parquet"
    assert (
        main(
            [
                "train",
                "--features",
                F,
                "--dictionary",
                "artifacts/features/feature_dictionary.json",
                "--patients",
                "patients.parquet",
                "--out",
                "artifacts/model",
            ]
        )
        == 0
    )
    run_info = json.loads((workdir / "artifacts/model/run.json").read_text())
    assert run_info["tuning"]["n_trials"] == 2
    assert (
        main(
            [
                "evaluate",
                "--model-dir",
                "artifacts/model",
                "--features",
                F,
                "--metrics",
                "reports/metrics.json",
                "--plots",
                "reports/plots",
                "--figures",
                "reports/figures",
                "--card",
                "reports/model_card.md",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "register",
                "--model-dir",
                "artifacts/model",
                "--features",
                F,
                "--metrics",
                "reports/metrics.json",
                "--out",
                "reports/register.json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "version 1 -> @champion" in out and "AUROC" in out and "NEWS2" in out
    assert "news2_ge_5" in out

    # reports: metrics with CIs, DVC plot data, figures, model card
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert {"auroc_ci_low", "auroc_ci_high", "auprc", "brier", "calibration_slope"} <= set(
        metrics["model"]
    )
    assert {"sex_F", "sex_M"} <= set(metrics["subgroups"])
    female = metrics["subgroups"]["sex_F"]["model"]
    assert female["auroc_ci_low"] <= female["auroc"] <= female["auroc_ci_high"]
    for name in (
        "roc_model",
        "roc_news2",
        "pr_model",
        "calibration_model",
        "alerts_news2",
        "importance",
    ):
        assert (workdir / f"reports/plots/{name}.csv").is_file()
    card = (workdir / "reports/model_card.md").read_text()
    assert "## Intended use" in card and "## Limitations" in card and "NEWS2" in card
    assert not re.search(r"p_[0-9a-f]{20}", card)  # no patient pseudonyms in the model card

    # the MLflow run shows params, metrics, plots, model card, lineage; trials are nested runs
    client = mlflow.MlflowClient()
    run = client.get_run(run_info["run_id"])
    assert run.data.params["train.learning_rate"] == "0.05"
    assert "test.model.auroc" in run.data.metrics
    assert run.data.tags["consent_purpose"] == "model_training"
    assert run.data.tags["params_hash"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "lineage.json", "feature_dictionary.json", "evaluation"} <= arts
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/figures")}
    assert "evaluation/figures/roc.png" in figs
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 2 and all("val_auprc" in c.data.metrics for c in children)
    local = client.download_artifacts(run.info.run_id, "lineage.json", str(workdir))
    lineage = json.loads(Path(local).read_text())
    assert lineage["consent"]["patients_excluded"] == 3

    # people: promote an unknown version / roll back without history -> one-line errors, exit 2
    assert main(["promote", "--version", "9", "--reason", "x"]) == 2
    assert main(["rollback", "--reason", "x"]) == 2
    err = capsys.readouterr().err
    assert "no previous champion" in err and "Traceback" not in err


def test_misspelt_param_is_a_user_error(workdir, capsys):
    params = dict(PARAMS, train={"learnig_rate": 0.1})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--features", "artifacts/features/features.parquet", "--out", "m"]) == 2
    assert "train.learnig_rate: unknown key" in capsys.readouterr().err


def test_missing_features_file_is_a_user_error(workdir, capsys):
    assert main(["train", "--features", "nope.parquet", "--out", "m"]) == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_tune_command_logs_nested_trials(workdir, capsys):
    out = workdir / "tuning.json"
    args = ["tune", "--features", "artifacts/features/features.parquet", "--trials", "3"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_trials"] == 3 and set(result["best_params"]) >= {"learning_rate", "num_leaves"}
    assert "dvc exp run -S train." in capsys.readouterr().out
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("vitalrisk")
    parent = client.search_runs([exp.experiment_id], "tags.stage = 'tune'")[0]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 3


def test_model_dir_from_another_store_is_one_clear_message(workdir, capsys, monkeypatch):
    """DVC restored artifacts/model from its cache, but the MLflow store lacks the run."""
    quick = dict(PARAMS, train={"cv_folds": 0, "n_estimators": 50})
    (workdir / "params.yaml").write_text(yaml.safe_dump(quick))
    F = "artifacts/features/features.parquet"
    assert main(["train", "--features", F, "--out", "artifacts/model"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/other.db")
    capsys.readouterr()
    argv = ["evaluate", "--model-dir", "artifacts/model", "--metrics", "m.json"]
    argv += ["--plots", "p", "--figures", "f", "--card", "c.md"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "artifacts/model/run.json refers to MLflow run" in err and "other.db" in err
    assert "dvc repro --force train" in err and "Traceback" not in err
    (workdir / "m.json").write_text("{}")
    assert main(["register", "--model-dir", "artifacts/model", "--features", F, "--metrics",
                 "m.json", "--out", "r.json"]) == 2  # fmt: skip
    assert "refers to MLflow run" in capsys.readouterr().err
