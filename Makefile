# The README's two commands. TORCH pins the CPU wheel on machines that carry it locally; elsewhere
# pip takes torch from PyPI as usual.
PYTHON ?= python3
TORCH ?= torch==2.13.0
MODEL ?= random:gpt2
PYTEST_ARGS ?=
# peers: two rounds of every engine taking turns, best of two timed runs per figure (~25 min on 2 cores)
PEERS_ARGS ?= --rounds 2 --repeats 2

.PHONY: install serve install-test test bench-peers bench-offline

install:
	$(PYTHON) -m pip install "$(TORCH)" -e .

serve: install
	gpt2serve serve --model $(MODEL) --host 127.0.0.1 --port 8000

install-test:
	$(PYTHON) -m pip install "$(TORCH)" -e ".[test]"
	bash scripts/test-services.sh

test: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Speed: our engine beside transformers / CTranslate2 / llama.cpp on the same random weights, one run.
bench-peers: install
	$(PYTHON) -m pip install "$(TORCH)" -e ".[bench,peers]"
	$(PYTHON) -m gpt2serve.bench.peers $(PEERS_ARGS) --json bench-results/peers.json --markdown bench-results/peers.md

bench-offline: install
	gpt2serve bench offline --model $(MODEL)
