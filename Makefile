# Everything a fresh machine needs: `make train` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ALGO ?= TRPO
# A POSIX shell's start-up file is named by an exported ENV on some systems: that path is no Gymnasium id
ifeq ($(origin ENV),environment)
ifneq ($(wildcard $(ENV)),)
ENV := CartPole-v1
endif
endif
ENV ?= CartPole-v1
TIMESTEPS ?=
N_JOBS ?= auto

.PHONY: install train test docs lint type format benchmark clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU build is taken from a local wheel where one is at hand
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[tests,docs,zoo]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m sb3_trust.train --algo $(ALGO) --env $(ENV) $(if $(TIMESTEPS),--timesteps $(TIMESTEPS),)

test: $(STAMP)
	$(PY) -m pytest -n $(N_JOBS) tests
	$(MAKE) lint type docs

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(PY) -m ruff check sb3_trust tests
	$(PY) -m black --check sb3_trust tests

type: $(STAMP)
	$(PY) -m mypy sb3_trust

format: $(STAMP)
	$(PY) -m ruff check --fix sb3_trust tests
	$(PY) -m black sb3_trust tests

benchmark: $(STAMP)
	$(PY) -m sb3_trust.benchmark

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis
