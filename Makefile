# Two commands do all the set-up on a fresh machine:
#   make demo   - a local swarm: coordinator, volunteers and dashboard on 127.0.0.1
#   make test   - the test suite (real peers, servers and browser on loopback); as root it first installs Chromium,
#                 its driver and PostgreSQL with apt-get
# Also: make bench (lists the benchmarks; make bench B="NAME ..." runs them), make lint, make codegen(-check).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint codegen codegen-check bench clean

# The captioned digits (examples/runs/digits-captioned.toml): toy frozen parts, then latent shards with a manifest.
data/digits-captioned/manifest.json: $(STAMP)
	$(BIN)/omi-data toy-parts --out data/sana-digits-parts
	$(BIN)/omi-data prepare builtin:digits --parts data/sana-digits-parts --out data/digits-captioned

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the CPU build that lies on this disk; the project's range admits it.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.3,<2.15"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Chromium, its driver and PostgreSQL first (scripts/install_system_deps.sh: apt-get as root, else one line on what
# is missing and what that does to the tests). Then two phases: the in-process tests on 2 pytest-xdist workers, then
# the multi-process swarms (marked slow) one at a time, as each of them uses both cores. The first phase that fails
# stops the target.
test: $(STAMP)
	scripts/install_system_deps.sh
	$(BIN)/python -m pytest -q --durations=15 -m "not slow" -n 2
	$(BIN)/python -m pytest -q --durations=15 -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

codegen: $(STAMP)
	$(BIN)/python scripts/codegen.py

codegen-check: $(STAMP)
	$(BIN)/python scripts/codegen.py --check

# Benchmarks (bench/__main__.py): `make bench` lists them with how to run each; `make bench B="models"` runs one,
# `make bench B="dashboard -- --seconds 4"` passes it options. Each rewrites its section of docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m bench $(B)

data/digits-captioned: data/digits-captioned/manifest.json

clean:
	rm -rf $(VENV) build *.egg-info
