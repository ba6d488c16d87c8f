# routesvc task runner. Two commands do everything on a fresh machine:
#   make run    install what is needed and run the service on its embedded defaults
#   make test   install what is needed and run every check and test (what CI runs)

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Slow-to-build things (pip wheels, Go modules, Jaeger, npm and Maven packages) are cached here,
# outside the checkout, and reused when present.
export ROUTESVC_CACHE ?= $(HOME)/.cache/routesvc
export PIP_CACHE_DIR ?= $(ROUTESVC_CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install run test proto check-generated lint typecheck tools pytest clients clean lock

# The versions the image installs (deploy/requirements.lock, every file's hash) are the versions
# serving and the tests run on here too: pip reads the lock as constraints, without its hashes
# (pip checks none for an editable install, and refuses a hashed constraints file beside one).
LOCK := deploy/requirements.lock
CONSTRAINTS := $(VENV)/constraints.txt

# What serving needs (`make run`), then the tools and test dependencies on top (everything else).
$(VENV)/.installed-run: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	sed -e '/^ *--hash=/d' -e 's/ *\\$$//' $(LOCK) > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Resolve pyproject.toml's dependencies again, for every platform (the image's linux/amd64 and
# linux/arm64 among them), to their newest versions, with the sha256 of every file; commit the result.
lock: $(VENV)/.installed-run
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

install: $(VENV)/.installed

run: $(VENV)/.installed-run
	$(VENV)/bin/routesvc serve $(ARGS)

# Regenerate the Python stubs in routesvc/v1 from protos/ (never edit them by hand).
proto: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. protos/routesvc/v1/*.proto

# Fails when the checked-in stubs differ from what protos/ generates.
check-generated: install
	rm -rf build/gen && mkdir -p build/gen
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=build/gen --grpc_python_out=build/gen --mypy_out=build/gen --mypy_grpc_out=build/gen protos/routesvc/v1/*.proto
	@for f in build/gen/routesvc/v1/*; do \
	  diff -q "$$f" "routesvc/v1/$$(basename $$f)" >/dev/null || { echo "generated code is stale: run 'make proto' ($$f)"; exit 1; }; \
	done; echo "generated code is up to date"

lint: install
	$(VENV)/bin/ruff check routesvc tests bench
	$(VENV)/bin/ruff format --check routesvc tests bench

typecheck: install
	$(VENV)/bin/mypy routesvc

# Tools the tests need beyond Python packages: a real Jaeger (built once from the Go module
# proxy into $(ROUTESVC_CACHE)), kustomize where kubectl is absent, and redis-server (Debian).
tools: install
	bash .ci/jaeger.sh >/dev/null
	ROUTESVC_VENV=$(abspath $(VENV)) bash .ci/deploy-check.sh --prepare
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

pytest: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The Go, TypeScript, Java and Python clients: regenerated (CI fails on drift), buf lint and
# breaking, then their interop tests against a live service backed by the fake provider.
clients: install
	VENV=$(VENV) bash .ci/clients.sh

test: install check-generated lint typecheck tools pytest clients

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
