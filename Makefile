# avray: `make demo` sets up .venv and runs the main job on generated media; `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo

.PHONY: demo test bench-ingest bench-train clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/avray synth --out $(DEMO)/media --videos 8 --seed 0
	$(BIN)/avray preprocess $(DEMO)/media/manifest.jsonl --out $(DEMO)/clips-out

test: $(STAMP)
	$(BIN)/python -m pytest

bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/ingest.py --runs 3 --write BENCHMARKS.md

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train.py --runs 3 --write BENCHMARKS.md

clean:
	rm -rf $(DEMO) .pytest_cache
