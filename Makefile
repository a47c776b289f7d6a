# The two entry points the README opens with; both set the machine up first.
PY := .venv/bin/python

.PHONY: setup demo test unit kernel lint typecheck bench compare compare-deps clean

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
	.venv/bin/lint-imports  # the layering in pyproject.toml [tool.importlinter]

typecheck: setup
	$(PY) -m mypy cgpolicy

bench: setup
	$(PY) -m bench --output bench/results.json

# cgpolicy vs iptables vs nftables (bench/compare.py): needs iperf3, qperf, nftables, iptables
# (setup installs them too, for its smoke test) and matplotlib (the `bench` extra), which setup
# does not install. Idempotent.
COMPARE_APT := iperf3 qperf nftables iptables

compare-deps: setup
	@missing=""; for pkg in $(COMPARE_APT); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "compare: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'

compare: compare-deps
	$(PY) -m bench.compare

clean:
	rm -rf .venv .pytest_cache build *.egg-info
