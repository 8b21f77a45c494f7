# The two set-up commands of the README: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-caps bench-qhyvit bench-mptq bench-prune install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import vitcompress, timm, onnxruntime, nncf, openvino" 
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitcompress demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

# Each writes its own section of benchmarks/RESULTS.md; they need ../shared (reference models, CIFAR-10).
bench: $(STAMP)
	$(PY) benchmarks/bench_peers.py --out benchmarks/RESULTS.md

bench-caps: $(STAMP)
	$(PY) benchmarks/bench_speed_caps.py --out benchmarks/RESULTS.md

bench-qhyvit: $(STAMP)
	$(PY) benchmarks/bench_qhyvit.py --out benchmarks/RESULTS.md

bench-mptq: $(STAMP)
	$(PY) benchmarks/bench_mptq.py --out benchmarks/RESULTS.md

bench-prune: $(STAMP)
	$(PY) benchmarks/bench_prune.py --out benchmarks/RESULTS.md

clean:
	rm -rf demo-out bench-out .pytest_cache
