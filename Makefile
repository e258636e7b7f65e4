# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing and install
# the project (Python package + the Rust tokenizer extension); reinstalling is skipped when nothing changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raychat-installed
RUST_SOURCES := $(shell find tokenizer_rust -path tokenizer_rust/target -prune -o -type f \( -name '*.rs' -o -name '*.toml' -o -name '*.py' \) -print 2>/dev/null)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.25
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml $(RUST_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e ".[dev]"
	@if [ -d tokenizer_rust ]; then $(PY) -m pip install -q ./tokenizer_rust; fi
	@# DeepSpeed's CPU all-reduce op, compiled once here rather than in the first training run's start-up
	$(PY) -c "from raychat.train.backend import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The speedrun on the tiny `demo` preset on a local Ray (offline with RAYCHAT_DATA_DIR set): every stage,
# skipping finished ones, then the report card; then it serves the chat model (Ctrl-C stops it).
demo: install
	$(VENV)/bin/raychat speedrun --preset demo
	$(VENV)/bin/raychat serve --preset demo --set serve.source=rl

clean:
	rm -rf $(VENV) build *.egg-info tokenizer_rust/target
