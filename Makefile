# Every target bootstraps its own environment: only Python 3.11 and make are assumed.
PYTHON ?= python3
TOOLS  := .tools
UV     := $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
# Compiled bytecode matters for pctl: it runs dozens of times a minute.
export UV_COMPILE_BYTECODE := 1
RUN    := $(UV) run --frozen --no-progress

.PHONY: env examples demo test lint typecheck bench clean

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv

# The plugin packages are installed editable: their entry points live in their pyproject.toml.
PLUGIN_PROJECTS := $(wildcard examples/plugins/*/pyproject.toml tests/plugins/*/pyproject.toml)

.venv/.synced: pyproject.toml uv.lock $(PLUGIN_PROJECTS) | $(UV)
	$(UV) sync --frozen --no-progress
	.venv/bin/python -m compileall -q pollen
	touch $@

env: .venv/.synced

# Example workloads, built from source in examples/ into build/examples/NAME.wasm.
examples: env
	$(RUN) python examples/build.py --out build/examples

demo: env examples
	$(RUN) pollen demo

test: env
	$(RUN) ruff check pollen tests bench examples/plugins
	$(RUN) mypy
	$(RUN) mypy --strict examples/plugins/pollen-signer-label/src
	$(RUN) pytest -q -p no:cacheprovider

lint: env
	$(RUN) ruff check pollen tests bench examples/plugins
	$(RUN) ruff format --check pollen tests bench examples/plugins

typecheck: env
	$(RUN) mypy
	$(RUN) mypy --strict examples/plugins/pollen-signer-label/src

bench: env examples
	@command -v wrk >/dev/null || (apt-get install -y wrk >/dev/null 2>&1 || echo "wrk not installed: its rows are skipped")
	$(RUN) python -m bench.run

clean:
	rm -rf .venv $(TOOLS) build .pytest_cache .mypy_cache .ruff_cache
