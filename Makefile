# The two set-up commands of the README: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-avx2-emulated bench bench-caps bench-qhyvit bench-mptq bench-frontier bench-prune bench-emulated-cpu bench-workers conformance recipes bench-recipes install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import vitcompress, timm, onnxruntime, nncf, openvino, ray"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitcompress demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

# The CPU-dependent tests on AVX2 kernels without an AVX2 machine: qemu-x86_64 -cpu Haswell (CPUID:
# AVX2, no AVX-512/VNNI; apt-get install qemu-user). Emulated, so slow (about half an hour on 2 cores).
test-avx2-emulated: $(STAMP)
	qemu-x86_64 -cpu Haswell $(PY) -m pytest -q -p no:cacheprovider tests/test_export.py tests/test_cpu.py \
		-k "agrees_with_torch or signed_attention or test_cpu"

# Each writes its own section of benchmarks/RESULTS.md; they need ../shared (reference models, CIFAR-10).
bench: $(STAMP)
	$(PY) benchmarks/bench_peers.py --out benchmarks/RESULTS.md

bench-caps: $(STAMP)
	$(PY) benchmarks/bench_speed_caps.py --out benchmarks/RESULTS.md

bench-qhyvit: $(STAMP)
	$(PY) benchmarks/bench_qhyvit.py --out benchmarks/RESULTS.md

bench-mptq: $(STAMP)
	$(PY) benchmarks/bench_mptq.py --out benchmarks/RESULTS.md

# min-max / the method / + block reconstruction at W8A8, W6A6, W4A4 on the three reference models,
# reported on the half of val no choice was tuned on (long: about an hour per hybrid model on 2 cores)
bench-frontier: $(STAMP)
	$(PY) benchmarks/bench_frontier.py --out benchmarks/RESULTS.md

bench-prune: $(STAMP)
	$(PY) benchmarks/bench_prune.py --out benchmarks/RESULTS.md

# Every model family × every method (benchmarks/CONFORMANCE.md and the README's supported-model table);
# needs only the bundled images; long (hours on 2 cores), resumable with ARGS=--resume; the published
# ratios come from ARGS=--time, run afterwards on an otherwise idle machine.
conformance: $(STAMP)
	$(PY) benchmarks/bench_conformance.py $(ARGS)

# The same int8 artifacts natively and on AVX2 kernels (qemu-x86_64 -cpu Haswell; apt-get install qemu-user)
bench-emulated-cpu: $(STAMP)
	$(PY) benchmarks/bench_emulated_cpu.py --out benchmarks/RESULTS.md

bench-workers: $(STAMP)
	$(PY) benchmarks/bench_workers.py --out benchmarks/RESULTS.md --workers 2 --large --repeat 3
	$(PY) benchmarks/bench_workers.py --out benchmarks/RESULTS.md --workers 2 --repeat 3 --model deit_tiny_patch16_224

# Every shipped pipeline recipe on the shared reference models (../shared), each into runs/<name>;
# a re-run reuses finished steps. Fails on the first recipe whose check step fails.
recipes: $(STAMP)
	for r in recipes/mobilevit_w8a8_fast recipes/mobilevitv2_w6a6_qhyvit recipes/deit_w4a4_mptq recipes/deit_mp5_greedy recipes/deit_prune2x_w8a8; do \
		$(VENV)/bin/vitcompress run $$r.yaml --out runs/$$(basename $$r) || exit $$?; done

# The recipes' table in RESULTS.md (reuses the runs of `make recipes`).
bench-recipes: $(STAMP)
	$(PY) benchmarks/bench_recipes.py --out benchmarks/RESULTS.md

clean:
	rm -rf demo-out bench-out runs .pytest_cache
