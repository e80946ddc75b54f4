#!/bin/sh
# Everything CI checks: lint, format, types, the documentation site (warnings and broken
# references fail), then the whole test suite.
# The Redis tests start their own redis-server (installed here when missing and we may).
# Installs the dev extra, or the extras BUS_EXTRA names (.ci/run: dev,bench, so that the
# benchmarks' smoke tests run their peers too).
BUS_EXTRA="${BUS_EXTRA:-dev}"
. "$(dirname "$0")/_venv.sh"
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing redis-server (Debian package)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
    else
        echo "test.sh: redis-server not found; Redis tests will be skipped" >&2
    fi
fi
echo "== ruff check";        "$VENV/bin/ruff" check .
echo "== ruff format";       "$VENV/bin/ruff" format --check .
echo "== mypy --strict";     "$VENV/bin/mypy" --strict actors bus tests/typing
echo "== docs (sphinx -W -n)"; sh "$ROOT/scripts/docs.sh"
echo "== pytest";            "$PY" -m pytest "$@"
