# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

# (Re)install only when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Prefect keeps its state for the demo inside runs/ (no ~/.prefect), telemetry off.
demo: $(STAMP)
	@mkdir -p runs/.prefect
	PREFECT_HOME=$(CURDIR)/runs/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
	$(BIN)/wsireg-flow anhir --dataset data/anhir-sample --pairs data/anhir-sample/dataset.csv \
		--out runs/demo --progress

# Two test processes, one module each at a time (module fixtures are built once): the suite
# keeps about 1.2 of 2 cores busy when run alone, since many tests wait on subprocesses.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check wsireg_flow flows benchmarks_anhir tests
	$(BIN)/ruff format --check wsireg_flow flows benchmarks_anhir tests

clean:
	rm -rf runs .pytest_cache
