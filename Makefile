# The team's habits. `make demo` and `make test` create the environment first when needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_SILENT ?= true

.PHONY: env demo test test-all test-slow lint format bench lock clean

$(VENV)/.ready: requirements.lock pyproject.toml scripts/make_env.sh
	bash scripts/make_env.sh
	touch $@

env: $(VENV)/.ready

## The main job on the embedded default: every project's stage on the toy world, tiny presets, CPU.
demo: $(VENV)/.ready
	$(PY) scripts/demo.py

## The test suite (slow-marked tests excluded), W&B disabled, no network.
test: $(VENV)/.ready
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" -q

test-slow: $(VENV)/.ready
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow -q

test-all: $(VENV)/.ready
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(VENV)/.ready
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(VENV)/.ready
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

## Every benchmark of benchmarks/, printing ratios measured in one run.
bench: $(VENV)/.ready
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

## Re-pin requirements.lock from pyproject.toml (needs the package index).
lock:
	rm -rf /tmp/forgelab-lock && python3 -m venv /tmp/forgelab-lock
	/tmp/forgelab-lock/bin/pip install --quiet '.[dev]' wheel
	{ head -n2 requirements.lock; echo "setuptools==$$(/tmp/forgelab-lock/bin/python -c "import setuptools; print(setuptools.__version__)")"; echo "wheel==$$(/tmp/forgelab-lock/bin/python -c "import wheel; print(wheel.__version__)")"; \
	  /tmp/forgelab-lock/bin/pip freeze --exclude-editable | grep -v '^forgelab'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
