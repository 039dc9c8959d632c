# `make demo` and `make test` set themselves up on a fresh machine: they create .venv and
# install what they need (torch's CPU build 2.13.0 first, so the [torch] extra adds nothing).
VENV    := .venv
PY      := $(VENV)/bin/python
MLCLOUD := $(VENV)/bin/mlcloud
STAMP   := $(VENV)/.installed
DEMO    := mlcloud-demo

.PHONY: demo test test-fast lint bench clean sysdeps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check --no-compile "torch==2.13.0"
	@# bytecode on every core (pip compiles one file at a time; a file some package ships
	@# that does not compile only stays uncompiled, as pip would leave it): torch's while pip,
	@# on one core, installs the rest; then the rest (what is compiled already is skipped)
	$(PY) -m compileall -q -j 0 $(VENV)/lib/python3*/site-packages/torch >/dev/null & compiling=$$!; \
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -e ".[torch,test,postgresql]"; \
	installed=$$?; wait $$compiling; exit $$installed
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

# The SSH tests run real OpenSSH daemons as nodes, some in network namespaces (iproute2),
# the benches compare with rsync, and the state tests run a PostgreSQL server (initdb):
# install them when missing and we may (root); otherwise say what to install.
sysdeps:
	@missing=""; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	command -v rsync >/dev/null || missing="$$missing rsync"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system packages:$$missing (install them, e.g. sudo apt-get install$$missing)" >&2; exit 1; fi; \
	fi

demo: $(STAMP)
	@set -e; dir=$$(mktemp -d); \
	trap '$(MLCLOUD) down $(DEMO) --yes; rm -rf "$$dir"' EXIT; \
	$(MLCLOUD) init "$$dir/project"; \
	$(MLCLOUD) up $(DEMO) -f "$$dir/project/mlcloud.yaml" --yes; \
	$(MLCLOUD) train $(DEMO) -f "$$dir/project/mlcloud.yaml" --pull="$$dir/results"; \
	$(MLCLOUD) status $(DEMO)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Everything: the CI entry (.ci/run). In parallel (pytest-xdist: each worker its own loopback
# block for sshd nodes, namespace names and moto server; tests that must not overlap share an
# xdist_group), and the 25 slowest tests named at the end.
PYTEST_WORKERS ?= 4
test: $(STAMP) sysdeps lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25

# Everything but the end-to-end tests (sshd nodes, moto servers, torchrun): a quick loop.
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not e2e"

# Every bench runs and prints its figure even when another one missed its goal (exit 1).
bench: $(STAMP) sysdeps
	-$(PY) bench/cli_latency.py
	-$(PY) bench/ssh_exec.py
	-$(PY) bench/sync.py
	-$(PY) bench/agent_overhead.py
	-$(PY) bench/state.py
	-$(PY) bench/recovery.py --silent
	-$(PY) bench/recovery.py --provider aws
	-$(PY) bench/recovery.py --provider gce
	-$(PY) bench/managed.py

clean:
	rm -rf $(VENV) build dist *.egg-info
