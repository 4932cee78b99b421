# Each target builds what it needs: the virtual environment lives outside the clone, keyed by a
# hash of the dependency spec (scripts/venv.sh), so only the first run on a machine pays for torch.
SHELL := /bin/bash
VENV = $$(scripts/venv.sh)
RESULTS ?= results

.PHONY: demo test test-fast check-wheel venv lint bench bench-raft clean

venv:
	@scripts/venv.sh

demo:
	@venv=$(VENV) && $$venv/bin/python -m redge demo --out $(RESULTS)/demo

test:
	@venv=$(VENV) && $$venv/bin/python -m pytest

# `pip install .` into a fresh environment, then a chaos scenario from outside the clone.
check-wheel:
	@scripts/check-wheel.sh

# The pure and in-process tests only: seconds, no peer processes.
test-fast:
	@venv=$(VENV) && $$venv/bin/python -m pytest -m "not cluster"

lint:
	@venv=$(VENV) && $$venv/bin/ruff check .

bench-raft:
	@venv=$(VENV) && $$venv/bin/python -m redge.chaos.bench_raft --out $(RESULTS)/bench_raft.json

bench: bench-raft

clean:
	rm -rf $(RESULTS) .pytest_cache .hypothesis
