# contentml: one entry point per job. `make demo` and `make test` install on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PORT ?= 8080
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/contentml/platform:$(VERSION)
TRAINING_IMAGE ?= ghcr.io/contentml/training:$(VERSION)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install browser demo test test-fast bytecode compile serve bench loadtest fuzz lint constraints manifests images

install: $(INSTALLED)

# Rebuilt only when the pins change. pip only brings uv; uv installs the rest to the same pins.
# torch comes first, as the CPU wheel from the machine's pip find-links where there are some
# (uv takes them as --find-links; it would otherwise get PyPI's build, as pip would):
# 11 s against pip's 21 s. deepspeed, which builds from source and imports torch in its
# setup.py, then finds it (DS_BUILD_OPS=0: no CUDA ops at install). The project last: 46 s
# against pip's 88 s. uv compiles the bytecode as pip does: where PYTHONDONTWRITEBYTECODE is
# set (CI), every process would otherwise compile mlflow, transformers... anew (the suite took
# 1,226 s, not 830 s).
UV_INSTALL = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==25.3 setuptools==80.9.0 wheel==0.45.1 uv==0.13.9
	$(UV_INSTALL) $(foreach links,$(PIP_FIND_LINKS),--find-links $(links)) torch==2.13.0
	DS_BUILD_OPS=0 $(UV_INSTALL) --no-build-isolation deepspeed==0.19.8
	$(UV_INSTALL) -e '.[dev]'
	touch $@

# The console's browser tests (tests/serving/test_console.py) drive Debian's Chromium: installed
# here when missing, where apt-get is at hand and we are root; elsewhere they skip saying why.
browser:
	@command -v chromedriver >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
		|| { apt-get update -q && apt-get install -y -q chromium chromium-driver; }

demo: install
	$(VENV)/bin/contentml demo

# Three workers on 2 cores, a test module each (its fixtures load once): much of the suite
# waits on servers and child processes starting. With two workers the cores were 83 % busy.
# Modules go out in tests/conftest.py's order, the slow ones first (--no-loadscope-reorder:
# xdist would send the modules with the most tests first, and the long end-to-end ones last).
test: install browser bytecode
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=20

# The inner loop: the tests not marked slow (tests/unit, data, model, serving, e2e by kind).
test-fast: install bytecode
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not slow"

# The project's own bytecode, compiled once before a test run: where PYTHONDONTWRITEBYTECODE is
# set (CI), each of the suite's ~150 Python processes would compile the modules it imports
# anew (0.4 s each). Hidden folders (.venv, .git, .contentml) are left alone.
bytecode: install
	$(PY) -m compileall -q -x '/\.' .

compile: install
	$(VENV)/bin/contentml pipeline compile

# Render the dev and prod overlays with `kubectl kustomize` and check every object against
# Kubernetes' schemas and the KServe / Kubeflow Trainer CRDs (tests/unit/test_manifests.py too).
manifests: install
	@command -v kubectl >/dev/null || { echo "make manifests needs kubectl >= 1.27 (kustomize 5) on PATH"; exit 2; }
	$(VENV)/bin/contentml manifests check --schemas ../shared/schemas

# The platform image (KFP components, predictors, MLflow and Feast servers) and the GPU image of
# the TrainJob ranks; docs/deploy.md says where to push them.
images:
	docker build -t $(IMAGE) .
	docker build -f Dockerfile.training -t $(TRAINING_IMAGE) .

serve: install
	$(VENV)/bin/contentml serve --port $(PORT)

bench: install
	$(PY) -m benchmarks.trend
	$(PY) -m benchmarks.quality
	$(PY) -m benchmarks.revenue
	$(PY) -m benchmarks.revenue_served
	$(PY) -m benchmarks.prediction_log
	$(PY) -m benchmarks.optimization
	$(PY) -m benchmarks.batch
	$(PY) -m benchmarks.serving_floor

# Load and soak tests with locust against a real `contentml serve` (tests/load/; not part of
# `make test`): steady state, promote/rollback cycles, 2x saturation and a soak of SOAK_MINUTES;
# about 10 minutes, plus the training pipeline where CONTENTML_HOME has no trend champion.
SOAK_MINUTES ?= 2
loadtest: install
	$(PY) -m tests.load --soak-minutes $(SOAK_MINUTES)

# Property-based fuzzing with schemathesis of every operation in a real `contentml serve`'s
# /openapi.json, with its tokens (tests/fuzz.py; not part of `make test`); fails on any answer
# >= 500 or a route open without its token. FUZZ_MAX_EXAMPLES cases per operation and phase;
# FUZZ_HOME keeps the trained champions between runs (default: a temporary folder, trained by
# `contentml demo`); reports and the server's log go to .contentml/fuzz/. About 15 minutes from
# an empty FUZZ_HOME on 2 cores, 5 once it has the champions.
FUZZ_MAX_EXAMPLES ?= 200
FUZZ_HOME ?=
FUZZ_SEED ?=
fuzz: install
	$(PY) -m tests.fuzz --max-examples $(FUZZ_MAX_EXAMPLES) $(if $(FUZZ_HOME),--home $(FUZZ_HOME)) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Refresh the lock after changing pyproject.toml's pins (run inside a working install).
constraints:
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.txt
