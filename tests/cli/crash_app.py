"""A worker app whose worker processes die at start: ``bus worker`` with
``--processes`` (the supervisor) finds the broker, each child exits at once."""

from __future__ import annotations

import os

import bus

if os.environ.get("BUS_WORKER_SLOT") is not None:
    raise SystemExit(3)  # a child of the supervisor: crash at start

broker = bus.InMemoryBroker()
