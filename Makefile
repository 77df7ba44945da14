# make quickstart: set up .venv if missing, then fine-tune the embedded demo.
# make preference-demo [STAGE=dpo|orpo|simpo|kto]: DPO (or STAGE) from the quickstart's result.
# make test:       set up .venv if missing, then run the test suite (one pytest-xdist worker
#                  per core, one torch thread each; each test file runs whole in one worker).
# make test-fast:  the same without the tests marked slow (tests/slow.txt: every test a full run
#                  timed at 0.5 s or more on the AVX-512 kind, made by scripts/slow_tests.py): the edit loop.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snug-installed
# pytest-xdist workers: one per CPU the OS gives us
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
XDIST := -n $(WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: quickstart preference-demo test test-fast lint data base

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# uv (from the package registry) installs in seconds where pip takes a minute and a half
	# (2026-11-28, this 2-core machine: 4 s for torch from its local wheel, 5 s for the rest;
	# pip 29 s and 50 s). It reads pip's find-links if set: the CPU wheel of torch lies on disk
	# here; elsewhere the registry gives the build that fits the machine. pip when uv cannot be
	# had or fails. --compile-bytecode: uv leaves the .py files uncompiled (pip compiles them),
	# and where PYTHONDONTWRITEBYTECODE is set (as on this machine) every process would compile
	# torch and transformers again: 23 s to import snug's planner and a model class without the
	# bytecode, 8 s with it (2026-11-28, this machine), for about 28 s more at install (14 s -> 42 s).
	$(PY) -m pip install -q uv || true
	if $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $${PIP_FIND_LINKS:+--find-links $$PIP_FIND_LINKS} \
		torch==2.13.0 -e ".[dev]"; then :; else \
		$(PY) -m pip install -q --upgrade pip && \
		{ $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.6"; } && \
		$(PY) -m pip install -q -e ".[dev]"; fi
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/snug train examples/quickstart.yaml

# Preference training from the quickstart's result (README: Preference training): the
# quickstart if its adapter is missing, that adapter merged into merged/quickstart if the merge
# is missing or older than the adapter (make compares the files' times), then STAGE's example.
# The merge is written aside and renamed into place, so a failed merge leaves the old one.
STAGE ?= dpo
QUICKSTART_ADAPTER := runs/quickstart/adapter/adapter_model.safetensors
QUICKSTART_MERGED := merged/quickstart/config.json

$(QUICKSTART_ADAPTER): | $(STAMP)
	$(VENV)/bin/snug train examples/quickstart.yaml

$(QUICKSTART_MERGED): $(QUICKSTART_ADAPTER) | $(STAMP)
	rm -rf merged/quickstart.new
	$(VENV)/bin/snug merge --adapter runs/quickstart --out merged/quickstart.new
	rm -rf merged/quickstart
	mv merged/quickstart.new merged/quickstart

preference-demo: $(STAMP) $(QUICKSTART_MERGED)
	$(VENV)/bin/snug train examples/$(STAGE).yaml

test: $(STAMP)
	$(PY) -m pytest $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check snug tests scripts benchmarks
	$(VENV)/bin/ruff format --check snug tests scripts benchmarks

# Remake the bundled data and the tiny base model (not needed to use snug).
data: $(STAMP)
	$(PY) scripts/make_demo_data.py
base: $(STAMP)
	$(PY) scripts/make_tiny_base.py
