# `make demo` and `make test` set themselves up on a fresh machine: they create .venv and
# install what they need (torch's CPU build 2.13.0 first, so the [torch] extra adds nothing).
VENV    := .venv
PY      := $(VENV)/bin/python
MLCLOUD := $(VENV)/bin/mlcloud
STAMP   := $(VENV)/.installed
DEMO    := mlcloud-demo

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[torch,test]"
	touch $(STAMP)

demo: $(STAMP)
	@set -e; dir=$$(mktemp -d); \
	trap '$(MLCLOUD) down $(DEMO) --yes; rm -rf "$$dir"' EXIT; \
	$(MLCLOUD) init "$$dir/project"; \
	$(MLCLOUD) up $(DEMO) -f "$$dir/project/mlcloud.yaml" --yes; \
	$(MLCLOUD) train $(DEMO) -f "$$dir/project/mlcloud.yaml"; \
	$(MLCLOUD) status $(DEMO)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/cli_latency.py

clean:
	rm -rf $(VENV) build dist *.egg-info
