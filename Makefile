# The README's two commands, each working on a fresh machine with Python 3.11 and the package
# registries: `make demo` (install, start the local stack, run the pipeline demo, leave the stack
# up) and `make test` (install, run the whole test suite; exit code = result).

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-stack install browser

install: $(STAMP)

# torch goes in first and alone, pinned, so that the resolver never swaps it for another build
# (GPU users install the CUDA build of torch 2.13.0 into .venv before `make`: see the README).
$(STAMP): pyproject.toml ops/s3/package-lock.json tests/promql/package-lock.json
	@set -e; \
	if [ ! -x $(BIN)/python ]; then \
		py=""; \
		for candidate in python3.11 python3; do \
			if command -v $$candidate >/dev/null 2>&1 && \
			   $$candidate -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
				py=$$candidate; break; \
			fi; \
		done; \
		if [ -z "$$py" ]; then echo "error: Python 3.11 is required (python3.11, or python3 being 3.11)" >&2; exit 1; fi; \
		echo "creating $(VENV) with $$(command -v $$py)"; \
		$$py -m venv $(VENV); \
	fi; \
	if ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		echo "error: $(VENV) is not Python 3.11: remove it (rm -rf $(VENV)) and run make again" >&2; exit 1; \
	fi
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	@command -v npm >/dev/null 2>&1 || { echo "error: Node.js and npm are required (the local stack's object store)" >&2; exit 1; }
	npm ci --prefix ops/s3 --no-audit --no-fund
	npm ci --prefix tests/promql --no-audit --no-fund
	@$(MAKE) --no-print-directory browser
	touch $@

# The browser test (an approver's clicks in the MLflow UI) drives Debian's headless Chromium
# through its chromedriver: installed here when missing (root on Debian), else a clear error.
browser:
	@set -e; \
	if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium and chromium-driver (the browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "error: the browser test needs Chromium and its driver: as root on Debian run" \
		     "'apt-get install chromium chromium-driver' (or put chromium and chromedriver on PATH)" >&2; \
		exit 1; \
	fi

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# Starts the stack (idempotent: a running one is reused), runs the demo, then prints the URLs, the
# files that hold the credentials and the stop command again (`stack up` reuses the running stack and prints them),
# and leaves the stack running.
demo: $(STAMP)
	$(BIN)/onerec-fp8 stack up > /dev/null
	@set -o pipefail; status=0; \
	$(BIN)/python -m tasks.demo || status=$$?; \
	$(BIN)/onerec-fp8 stack up 2>&1 > /dev/null | grep -v ' INFO ops.stack: ' >&2 || status=$$?; \
	echo "The stack keeps running. Stop it with: $(BIN)/onerec-fp8 stack down" >&2; \
	exit $$status

# Stops the local stack and deletes its state: S3 objects, databases, logs, generated Airflow password.
# (`stack down` alone keeps all of it.)
clean-stack:
	@if [ -x $(BIN)/onerec-fp8 ]; then $(BIN)/onerec-fp8 stack down; fi
	rm -rf .onerec
