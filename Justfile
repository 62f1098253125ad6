# wsfanout: the commands humans and CI both run.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv + "/bin"
python := env_var_or_default("PYTHON", "python3")
bind := env_var_or_default("WSFANOUT_BIND", "127.0.0.1:8000")

# list the recipes
default:
    @just --list

# create .venv and install wsfanout with its test and dev tools (skipped when up to date)
install:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! {{python}} -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "wsfanout needs Python 3.11 or newer; {{python}} is $({{python}} --version 2>&1)" >&2
        exit 1
    fi
    if [ ! -x {{bin}}/python ]; then
        echo "creating {{venv}}"
        {{python}} -m venv {{venv}}
    fi
    stamp={{venv}}/.installed
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing wsfanout and its tools into {{venv}}"
        {{bin}}/python -m pip install -q --disable-pip-version-check --upgrade pip
        {{bin}}/python -m pip install -q --disable-pip-version-check -e '.[dev]'
        touch "$stamp"
    fi

# create the demo users and serve on http://127.0.0.1:8000
serve: install
    {{bin}}/wsfanout demo
    {{bin}}/wsfanout serve --bind {{bind}}

# lint, types, and the whole test suite
test: lint
    {{bin}}/python -m pytest

# ruff (format check and lint) and mypy --strict
lint: install
    {{bin}}/ruff format --check src tests bench
    {{bin}}/ruff check src tests bench
    {{bin}}/mypy
    {{bin}}/hadolint Containerfile

# format the code
fmt: install
    {{bin}}/ruff format src tests bench
    {{bin}}/ruff check --fix src tests bench
