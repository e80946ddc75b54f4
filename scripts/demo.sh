#!/bin/sh
# The main job: a producer sends tasks, an in-memory worker runs them, results are printed.
. "$(dirname "$0")/_venv.sh" redis
exec "$PY" examples/quickstart.py
