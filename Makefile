# Two commands set everything up: `make demo` and `make test` each create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel on the first install so a CPU machine never downloads a CUDA build;
# a GPU user who installed their own torch into .venv keeps it (the project's range accepts it).
TORCH ?= torch==2.13.0
# the exact versions the suite last passed with (pyproject.toml keeps open ranges); `make setup CONSTRAINTS=`
# installs without them, `make constraints` rewrites the file from .venv after a green `make test`
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup demo test lint clean constraints

$(BIN)/ft: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $(BIN)/ft

setup: $(BIN)/ft

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/ft demo --workdir demo-run

test: setup
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests --durations=25

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(ft|torch)=='; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) demo-run .pytest_cache
