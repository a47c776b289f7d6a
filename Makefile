# The two entry points the README opens with; both set the machine up first.
PY := .venv/bin/python

.PHONY: setup demo test unit kernel lint bench clean

setup:
	./scripts/setup.sh

demo: setup
	./scripts/demo.sh

test: setup
	$(PY) -m pytest tests

unit: setup
	$(PY) -m pytest tests/unit

kernel: setup
	$(PY) -m pytest tests/kernel

lint: setup
	$(PY) -m ruff check cgpolicy tests bench
	$(PY) -m ruff format --check cgpolicy tests bench

bench: setup
	$(PY) -m bench --output bench/results.json

clean:
	rm -rf .venv .pytest_cache build *.egg-info
