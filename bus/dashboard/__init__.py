"""A web dashboard for the bus (install the ``trio-bus[dashboard]`` extra).

``bus dashboard MODULE:BROKER`` serves it; ``bus.dashboard.app(broker)`` is the same
page and JSON API as an ASGI application to mount in your own Trio web service. It
shows the queue (depth, delayed, pending per consumer, rates as small charts), the live
workers, the tasks running now with their progress, recent failures, dead letters
(requeue and purge with ``allow_actions``), and a task by id. See docs/observability.md.
"""

try:
    import hypercorn  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "bus.dashboard needs the dashboard extra: pip install 'trio-bus[dashboard]'"
    ) from exc

from bus.dashboard._app import Dashboard, app, serve

__all__ = ["Dashboard", "app", "serve"]
