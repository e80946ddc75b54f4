"""Quiet structlog loggers for libraries.

A library must not print to stdout unless the application configured logging. These
loggers are structlog loggers once the application has called
``structlog.configure()`` (events keep every bound key, and ``capture_logs`` sees
them). Until then, ``debug`` and ``info`` events are dropped and ``warning`` and
worse go to stderr, one line each, without colours. The ``bus`` package uses the same
loggers.

structlog is not imported here until it is needed: an application that configured it
has imported it (so a logger looks for it in ``sys.modules``), and the stderr lines
import it on the first warning. A worker of an application that logs another way
starts without it (with ``rich`` installed, ``import structlog`` takes tens of
milliseconds).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["QuietLogger", "get_logger"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40}
_LEVELS["critical"] = _LEVELS["fatal"] = 50

_fallback: Any = None


def _configured() -> Any:
    """structlog, when the application configured it; else ``None``. Not imported, it
    cannot have been configured."""
    structlog = sys.modules.get("structlog")
    if structlog is not None and structlog.is_configured():
        return structlog
    return None


def _stderr_logger() -> Any:
    global _fallback
    if _fallback is None:
        import structlog

        _fallback = structlog.wrap_logger(
            structlog.PrintLogger(sys.stderr),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer(colors=False),
            ],
        )
    return _fallback


class QuietLogger:
    """A structlog-like logger that stays silent while structlog is unconfigured."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **values: Any) -> QuietLogger:
        return QuietLogger(self._name, {**self._context, **values})

    def _emit(self, level: str, event: str, kw: dict[str, Any]) -> None:
        structlog = _configured()
        if structlog is not None:
            logger = structlog.get_logger(self._name)
            getattr(logger, level)(event, **self._context, **kw)
            return
        if _LEVELS[level] < 30:
            return
        if level == "exception":
            kw.setdefault("exc_info", True)
            level = "error"
        getattr(_stderr_logger(), level)(event, logger=self._name, **self._context, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._emit("exception", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._emit("critical", event, kw)


def get_logger(name: str) -> QuietLogger:
    """A quiet logger named ``name`` (see the module docstring)."""
    return QuietLogger(name)
