# wsfanout: the commands humans and CI both run.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv + "/bin"
python := env_var_or_default("PYTHON", "python3")
bind := env_var_or_default("WSFANOUT_BIND", "127.0.0.1:8000")
# pytest-xdist workers: most tests wait on sockets and servers, so more than the cores pay
# (on 2 cores: 3 workers 5:08-5:21, 4 workers 4:34-4:36, and 5:37 with a busy loop on one core)
test_workers := env_var_or_default("TEST_WORKERS", "4")

# list the recipes
default:
    @just --list

# create .venv and install wsfanout with its test and dev tools (skipped when up to date)
install: (_install "dev")

# .venv with what `extras` needs: "dev" (tests, lint, docs), "docs" (MkDocs) or "serve" (wsfanout alone); a stamp
# per kind, so that serving after testing installs nothing and testing after serving adds the rest
_install extras:
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
    fresh() { [ -f "$1" ] && [ ! setup.cfg -nt "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
    if [ "{{extras}}" = dev ]; then
        spec='.[dev]' what="wsfanout and its tools"
        fresh {{venv}}/.installed-dev && exit 0
    elif [ "{{extras}}" = docs ]; then
        spec='.[docs]' what="wsfanout and the docs tools"
        fresh {{venv}}/.installed-dev && exit 0
        fresh {{venv}}/.installed-docs && exit 0
    else
        spec='.' what="wsfanout"
        # the dev install holds everything serving needs
        fresh {{venv}}/.installed-dev && exit 0
        fresh {{venv}}/.installed-serve && exit 0
    fi
    echo "installing $what into {{venv}}"
    {{bin}}/python -m pip install -q --disable-pip-version-check --upgrade pip
    {{bin}}/python -m pip install -q --disable-pip-version-check -e "$spec"
    touch {{venv}}/.installed-{{extras}}

# install wsfanout alone (no test tools), create the demo users, serve on http://127.0.0.1:8000
serve: (_install "serve")
    {{bin}}/wsfanout demo
    {{bin}}/wsfanout serve --bind {{bind}}

# lint, types, and the whole test suite on TEST_WORKERS workers (pytest args may follow).
# --maxschedchunk 1: pytest-xdist hands out tests one at a time, in tests/conftest.py's order
# (the slow ones first); by default each worker gets a quarter of its share at once, and the
# first one got every slow test in a row, running them for minutes after the others were done.
test *args: lint
    {{bin}}/python -m pytest -n {{test_workers}} --maxschedchunk 1 {{args}}

# ruff (format check and lint), mypy --strict, the layering of DESIGN section 3 (lint-imports), the docs site
lint: install
    {{bin}}/ruff format --check src tests bench examples
    {{bin}}/ruff check src tests bench examples
    {{bin}}/mypy
    {{bin}}/lint-imports
    {{bin}}/hadolint Containerfile
    site=$(mktemp -d) && NO_MKDOCS_2_WARNING=1 {{bin}}/mkdocs build --strict --site-dir "$site" && rm -r "$site"

# serve the documentation site on http://127.0.0.1:8008, rebuilt as docs/ changes
docs: (_install "docs")
    NO_MKDOCS_2_WARNING=1 {{bin}}/mkdocs serve --dev-addr 127.0.0.1:8008

# format the code
fmt: install
    {{bin}}/ruff format src tests bench examples
    {{bin}}/ruff check --fix src tests bench examples

# the benchmark: wsfanout beside a bare hypercorn app, one run (add --quick, --reps N, --only NAME, --profile DIR)
bench *args: install
    #!/usr/bin/env bash
    set -euo pipefail
    command -v node >/dev/null || { echo "the load generator needs Node.js (apt-get install nodejs npm)" >&2; exit 1; }
    [ -d bench/node_modules/ws ] || npm ci --no-audit --no-fund --prefix bench
    {{bin}}/python bench/run.py {{args}}

# the soak: 5,000 browser-like connections churning for 10 minutes on one node and on two (Redis);
# fails if memory or descriptors grow (add --duration S, --nodes 1|2, --plot FILE, --issue-rates, ...)
soak *args: install
    #!/usr/bin/env bash
    set -euo pipefail
    command -v node >/dev/null || { echo "the soak's clients need Node.js (apt-get install nodejs npm)" >&2; exit 1; }
    [ -d bench/node_modules/ws ] || npm ci --no-audit --no-fund --prefix bench
    {{bin}}/python -c 'import matplotlib' 2>/dev/null || {{bin}}/python -m pip install -q -e '.[bench]'
    {{bin}}/python bench/soak.py {{args}}

# the Autobahn|Testsuite fuzzingclient against an echo app served through wsfanout's server adapters,
# hypercorn and uvicorn, compression off and on (--fast: the CI subset; --server, --compression, --cases)
[positional-arguments]
conformance *args: install
    {{bin}}/python -m tests.conformance.run "$@"

# a headless locust run against a local server with the demo users (USERS, SECONDS to change)
locust users="50" seconds="60": install
    #!/usr/bin/env bash
    set -euo pipefail
    {{bin}}/python -c 'import locust, websockets' 2>/dev/null || {{bin}}/python -m pip install -q -e '.[bench]'
    data=$(mktemp -d)
    export WSFANOUT_DATA_DIR="$data" WSFANOUT_LOG_LEVEL=warning
    {{bin}}/wsfanout demo >/dev/null
    port=$({{bin}}/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    {{bin}}/hypercorn --bind "127.0.0.1:$port" wsfanout:app & server=$!
    trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
    {{bin}}/locust -f bench/locustfile.py --headless -u {{users}} -r 10 -t {{seconds}}s \
        --host "http://127.0.0.1:$port" --only-summary

# the chaos run: 3 nodes, 1,000 clients, seeded faults, an audit of every acknowledged message
# (add --duration SECONDS, --seed N, --clients N, --faults KINDS; docs/development.md)
chaos *args: install
    {{bin}}/python -m bench.chaos {{args}}
