#!/bin/sh
# Builds the documentation site into docs/_build/html (open docs/_build/html/index.html).
# Makes (or reuses) .venv and installs the docs extra into it, as scripts/test.sh does.
# The build is the one CI runs: warnings are errors and every reference must resolve
# (-W -n --keep-going, so one run lists them all). More arguments go to sphinx-build
# (-E: read every page again).
BUS_EXTRA=docs
. "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/sphinx-build" -q -W -n --keep-going -b html \
    -d docs/_build/doctrees "$@" docs docs/_build/html
