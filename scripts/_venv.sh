# Sourced by the other scripts: make (or reuse) .venv and install the project into it.
# Needs only python3 on the machine.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${BUS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.installed-$1"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$1]"
    touch "$STAMP"
fi
cd "$ROOT"
