#!/bin/sh
# The main job: a producer sends tasks, an in-memory worker runs them, results are printed.
BUS_EXTRA=
. "$(dirname "$0")/_venv.sh"
exec "$PY" examples/quickstart.py
