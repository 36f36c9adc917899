# vitalrisk: every target installs what it needs into .venv from the tested lock file.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
#: pytest-xdist workers for `make test` (the team-mode tests share one stack: one worker runs them)
TEST_WORKERS ?= 2
export PATH := $(BIN):$(PATH)
export PYTHONHASHSEED := 0
# no telemetry from MLflow, BentoML, Evidently or DVC
export DO_NOT_TRACK := 1
export BENTOML_DO_NOT_TRACK := True
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: install demo test lint typecheck unit bench serve bento mlflow-ui monitor-ui data-dvc clean team-up team-down team-status promtool browser

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the tested versions from requirements.lock into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/python -m pip install -r requirements.lock > $(VENV)/pip.log 2>&1 || (tail -n 30 $(VENV)/pip.log; exit 1)
	@$(BIN)/python -m pip install --no-deps -e . --config-settings editable_mode=compat >> $(VENV)/pip.log 2>&1 || (tail -n 30 $(VENV)/pip.log; exit 1)
	$(BIN)/python -c "import core, governance, ingest, simulate, features, models, serving, monitoring, pipelines, lightgbm, mlflow, bentoml, evidently, dvc"
	@touch $@

## demo: generate the default cohort, run the whole DVC pipeline, print a summary
demo: $(STAMP)
	vitalrisk simulate --out data
	dvc repro
	vitalrisk summary
	vitalrisk monitor --drift-demo older --exit-zero

## test: lint, format check, type check, the browser, then the test suite
test: $(STAMP) lint typecheck browser
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

## browser: Debian's chromium + chromedriver for the worklist browser test (installed when missing)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	echo "installing chromium and chromium-driver (the worklist browser test drives them)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	{ $$SUDO apt-get install -y chromium chromium-driver > /tmp/vitalrisk-apt.log 2>&1 \
	  || { $$SUDO apt-get update >> /tmp/vitalrisk-apt.log 2>&1 \
	       && $$SUDO apt-get install -y chromium chromium-driver >> /tmp/vitalrisk-apt.log 2>&1; }; } \
	  || { tail -n 20 /tmp/vitalrisk-apt.log; \
	       echo "cannot install chromium: run 'apt-get install -y chromium chromium-driver' (Debian/Ubuntu) and retry"; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

serve: $(STAMP)
	vitalrisk serve

## bento: a Bento pinning the registry's champion, runtime dependencies only
bento: $(STAMP)
	vitalrisk bento

## mlflow-ui: MLflow's own default store (mlflow.db here); artifact paths resolve from here
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --port $${PORT:-5000}

## monitor-ui: Evidently UI (projects vitalrisk-monitoring and vitalrisk-monitoring-demo)
monitor-ui: $(STAMP)
	$(BIN)/evidently ui --workspace $${EVIDENTLY_WORKSPACE:-workspace} --port $${PORT:-8000}

## team-up: start the local team stack as processes (settings: team.env; idempotent)
team-up: $(STAMP) promtool
	vitalrisk team up

## promtool: Prometheus' rule checker (Debian package prometheus) for ops/prometheus/alerts.yml;
## tests/serving/test_metrics.py runs it when present. Not fatal when it cannot be installed
promtool:
	@command -v promtool >/dev/null 2>&1 || (apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || sudo -n apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1) || echo "promtool not installed: apt-get install prometheus (the rule tests are skipped without it)"
	@command -v promtool >/dev/null 2>&1 && promtool check rules ops/prometheus/alerts.yml || true

## team-down: stop what team-up started here (services that were already running stay up)
team-down: $(STAMP)
	vitalrisk team down

team-status: $(STAMP)
	vitalrisk team status

## data-dvc: re-record data.dvc after a deliberate change to the default cohort
data-dvc: $(STAMP)
	vitalrisk simulate --out data
	dvc add data

## clean: every output of the pipeline, the MLflow store and the monitoring workspace
clean:
	rm -rf artifacts reports logs landing mlflow.db mlruns.db mlartifacts mlruns workspace dvc_plots
