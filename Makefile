# The README's commands. Each target creates/reuses .venv itself.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nmm-installed
PYTHON ?= python3

.PHONY: setup run byo test test-fast bench golden docs clean

setup: $(STAMP)

# torch first, from the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nmm run workflows/quickstart.yaml

# Bring your own data: write the digits as WebDataset shards into the store, then train on them.
byo: $(STAMP)
	$(VENV)/bin/nmm data export --source digits --format webdataset --out store://byo/digits --shard-size 500
	$(VENV)/bin/nmm run workflows/byo-webdataset.yaml

test: $(STAMP)
	$(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

# Speed figures (never asserted in tests), each a ratio against a baseline measured in the same run:
# training vs a same-size Hugging Face Llama; curation on Ray vs a single-process loop; serving with
# dynamic batching vs without.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) benchmarks/train_throughput.py --device cpu
	$(PY) benchmarks/train_throughput.py --device cpu --size small
	$(PY) benchmarks/curate_throughput.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/generate.py --device cpu
	$(PY) benchmarks/gpu_check.py --device cpu
	$(PY) benchmarks/operator_load.py

golden: $(STAMP)
	NMM_UPDATE_GOLDEN=1 $(VENV)/bin/pytest -q tests/unit/test_compile.py tests/unit/test_crd.py tests/unit/test_chart.py tests/unit/test_serving_objects.py

# The spec reference, generated from the pydantic models (a test keeps the checked-in page current).
docs: $(STAMP)
	$(PY) -m nmm.spec.reference > docs/pipelines.md

clean:
	rm -rf .nmm
