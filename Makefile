# The README's two commands. TORCH pins the CPU wheel on machines that carry it locally; elsewhere
# pip takes torch from PyPI as usual.
PYTHON ?= python3
TORCH ?= torch==2.13.0
MODEL ?= random:gpt2
PYTEST_ARGS ?=

.PHONY: install serve install-test test services

install:
	$(PYTHON) -m pip install "$(TORCH)" -e .

serve: install
	gpt2serve serve --model $(MODEL) --host 127.0.0.1 --port 8000

install-test:
	$(PYTHON) -m pip install "$(TORCH)" -e ".[test]"
	bash scripts/test-services.sh

test: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)
