# Two entry points: `make demo` and `make test`. Both create .venv on first use
# and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: two, one per core of the CI machine. Three starved Ray of
# CPU there (a live node declared dead mid-sweep). Each test module runs on one worker (--dist
# loadscope), so a module's shared experiment is built once, and the modules start in the order
# tests/conftest.py gives them, longest first (--no-loadscope-reorder).
PYTEST_WORKERS ?= 2
# Bytecode for dps_tune (and, for `make test`, the tests' helpers), written ahead: the suite starts several
# hundred Python processes (commands, Ray's trial workers), and where PYTHONDONTWRITEBYTECODE is set
# each of them would compile the package again. Python reads these files with or without that variable.
COMPILE := $(BIN)/python -m compileall -q dps_tune

.PHONY: demo test test-fast bench reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing dps_tune and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install --upgrade pip > $(VENV)/install.log 2>&1 \
	  && $(BIN)/python -m pip install -e '.[test]' >> $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@$(COMPILE)
	$(BIN)/dps-tune demo

# The S3-compatible server tests/sweep/test_s3.py starts on 127.0.0.1: npm's s3rver, pinned by its lock file.
# Without npm, or when the install fails, that test skips and says why; the rest of the suite runs.
S3RVER := tests/s3server/node_modules/.installed

$(S3RVER): tests/s3server/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  echo "installing s3rver into tests/s3server/node_modules (log: tests/s3server/npm.log)"; \
	  (cd tests/s3server && timeout 600 npm ci --no-audit --no-fund > npm.log 2>&1 && touch node_modules/.installed) \
	    || { tail -n 20 tests/s3server/npm.log; echo "s3rver install failed: tests/sweep/test_s3.py will skip"; }; \
	else echo "npm not found: tests/sweep/test_s3.py will skip"; fi

test: $(STAMP) $(S3RVER)
	@$(COMPILE) tests/support
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m dps_tune.bench rank
	$(BIN)/python -m dps_tune.bench data
	$(BIN)/python -m dps_tune.bench step --baseline
	$(BIN)/python -m dps_tune.bench storage

reference: $(STAMP)
	$(BIN)/python -m dps_tune.reference_doc > REFERENCE.md

clean:
	rm -rf $(VENV) build *.egg-info tests/s3server/node_modules
