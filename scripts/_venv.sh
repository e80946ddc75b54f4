# Sourced by the other scripts (set BUS_EXTRA to an extra's name, or names joined by commas, first): make (or reuse) .venv and install the project into it.
# Needs only python3 on the machine.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${BUS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
EXTRA="${BUS_EXTRA:-}"
STAMP="$VENV/.installed-${EXTRA:-base}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
    if [ -n "$EXTRA" ]; then SPEC="$ROOT[$EXTRA]"; else SPEC="$ROOT"; fi
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$SPEC"
    touch "$STAMP"
fi
cd "$ROOT"
