# Two commands do everything on a fresh machine:
#   make run   - create .venv, install skydeck, start the daemon (demo agent, SQLite in the data dir)
#   make test  - create .venv, install skydeck + test tools, run ruff, mypy --strict and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: RUN_STAMP = skydeck and what `skydeck serve` needs; STAMP = that plus
# the dev extra (tests, lint, types). Installing the dev extra satisfies both, so
# `make run` after `make test` installs nothing, and `make test` after `make run`
# adds the dev extra.
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed
# The pinned Claude Code CLI (shared/spec/claude-cli.md §1), installed project-locally.
CLAUDE_VERSION := 2.1.197
CLAUDE := .tools/claude/node_modules/.bin/claude
# Debian's Chromium for the browser tests (Playwright drives it; it downloads no browser).
CHROMIUM := /usr/bin/chromium
# Debian's bubblewrap for sandboxed turns (shared/spec/sandbox.md): the tests run it for real.
BWRAP := /usr/bin/bwrap

.PHONY: run test lint typecheck pytest bench claude clean postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@ $(RUN_STAMP)

$(CLAUDE):
	npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
		--prefix .tools/claude @anthropic-ai/claude-code@$(CLAUDE_VERSION)
	$(CLAUDE) --version | grep -q '^$(CLAUDE_VERSION) '

claude: $(CLAUDE)

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# PostgreSQL for the multi-host tests (tests/pg.py starts a throw-away cluster from these
# binaries); Debian's package, installed only when no initdb is there yet.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

$(BWRAP):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap

run: $(RUN_STAMP)
	$(BIN)/skydeck serve

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected no test: make treats that as a failure, so an empty run never passes.
pytest: $(STAMP) $(CLAUDE) $(CHROMIUM) $(BWRAP) postgres
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP) $(CLAUDE) $(BWRAP) postgres
	$(BIN)/python bench/queue_throughput.py
	$(BIN)/python bench/turn_overhead.py
	$(BIN)/python bench/warm_turns.py
	$(BIN)/python bench/sandbox_turns.py
	$(BIN)/python bench/http_ingest.py
	$(BIN)/python bench/scheduler.py
	$(BIN)/python bench/telegram_ingest.py
	$(BIN)/python bench/multi_host.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
