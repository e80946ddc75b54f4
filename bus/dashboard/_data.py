"""What the dashboard shows, as JSON-able dicts: no HTTP here, so it is tested and
reused on its own (the ASGI app in ``_app`` only routes to it).

Sources, all read inside the broker's lifetime: ``broker.inspect()`` (queue, pending
per consumer, delayed, dead letters, live workers), ``bus.activity.read_activity``
(the workers' published records: running tasks and recent failures), the result
backend (results, progress), the dead-letter store, and the history a sampler actor
keeps (one reading every ``sample_interval`` seconds, for the charts).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import time
from typing import TYPE_CHECKING, Any

import actors
from actors._log import get_logger
from bus._errors import ResultNotFound
from bus._ids import TaskID
from bus._observe import Sample, Samples, _queue_of, queue_readings, start_sampler
from bus.activity import Activity, read_activity
from bus.dashboard._svg import Series, line_chart
from bus.dashboard._workflows import list_workflows, one_workflow

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["ActionRefused", "DashboardData"]

log = get_logger("bus.dashboard")

#: How many running tasks (the longest running first) are listed, and get their
#: progress read, per overview.
RUNNING_SHOWN = 200
PROGRESS_LOOKUPS = 50
DEAD_SHOWN = 50
FAILURES_SHOWN = 50


class ActionRefused(Exception):
    """An action the dashboard will not do; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _short(value: Any, limit: int = 500) -> Any:
    """``value`` when its JSON is short, else its JSON cut to ``limit`` characters."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        return repr(value)[:limit]
    if len(text) <= limit:
        return json.loads(text)
    return text[:limit] + "..."


def _totals(activity: Activity | None) -> dict[str, dict[str, int]]:
    """Per worker: attempts finished and failed so far (from its ``broker.stats``)."""
    out: dict[str, dict[str, int]] = {}
    for w in activity.workers if activity else ():
        st = w.get("stats") or {}
        done = sum(int(st.get(k, 0)) for k in ("succeeded", "failed", "timed_out", "cancelled"))
        failed = int(st.get("failed", 0)) + int(st.get("timed_out", 0))
        out[str(w.get("worker"))] = {"done": done, "failed": failed}
    return out


def _rates(a: Sample, b: Sample) -> dict[str, float]:
    """Attempts per second between two samples, summed over the workers in both
    (a counter that went down belongs to a restarted process: its new value counts)."""
    dt = b.time - a.time
    out = {"done": 0.0, "failed": 0.0}
    if dt <= 0:
        return out
    before, after = a.extra.get("totals", {}), b.extra.get("totals", {})
    for worker, now in after.items():
        then = before.get(worker)
        if then is None:
            continue
        for key in out:
            d = now.get(key, 0) - then.get(key, 0)
            out[key] += (d if d >= 0 else now.get(key, 0)) / dt
    return out


class DashboardData:
    """Reads and actions of one dashboard (see the module docstring)."""

    def __init__(
        self,
        broker: Broker,
        *,
        allow_actions: bool = False,
        show_payloads: bool = False,
        sample_interval: float = 5.0,
        history: float = 900.0,
        refresh: float = 2.0,
    ) -> None:
        if not (sample_interval > 0 and math.isfinite(sample_interval)):
            raise ValueError(f"sample_interval must be > 0 seconds, not {sample_interval!r}")
        if not history >= sample_interval:
            raise ValueError("history must be at least one sample_interval")
        self.broker = broker
        self.allow_actions = allow_actions
        self.show_payloads = show_payloads
        self.sample_interval = float(sample_interval)
        self.history = float(history)
        self.refresh = float(refresh)
        self.samples = Samples(keep=int(history / sample_interval) + 1)
        self._sampler: actors.ActorRef | None = None
        self._starting = False
        #: Workflows this dashboard saw (running or ended), the newest last.
        self._workflows_seen: collections.OrderedDict[TaskID, None] = collections.OrderedDict()

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the history sampler in the broker's actor system (once; again after
        the broker restarted). It stops with the broker."""
        sampler = self._sampler
        if self._starting or (sampler is not None and sampler.is_alive):
            return
        if not self.broker.is_running:
            raise ActionRefused(503, "the broker is not running")
        self._starting = True
        try:
            self._sampler = await start_sampler(
                self.broker,
                self.samples,
                self.sample_interval,
                name="dashboard-sampler",
                extra=self._sample_extra,
            )
        finally:
            self._starting = False

    async def stop(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None and sampler.is_alive:
            await sampler.stop()

    async def _sample_extra(self) -> dict[str, Any]:
        return {"totals": _totals(await read_activity(self.broker, failures=1))}

    # ------------------------------------------------------------------ reads

    def describe(self) -> dict[str, Any]:
        b = self.broker
        out: dict[str, Any] = {
            "type": type(b).__name__,
            "queue": _queue_of(None, b),
            "distributed": b.distributed,
            "tasks": sorted(b.tasks),
        }
        url = getattr(b, "url", None)  # RedisBroker.url has no password
        if isinstance(url, str):
            out["url"] = url
        settings = getattr(b, "settings", None)
        if getattr(settings, "secret", None) is not None:
            out["signed"] = True  # never the secret itself
        return out

    async def overview(self) -> dict[str, Any]:
        """Everything the page shows, in one answer."""
        await self.start()
        broker = self.broker
        now = time.time()
        info = await broker.inspect()
        activity = await read_activity(broker, failures=FAILURES_SHOWN)
        records = {str(w.get("worker")): w for w in activity.workers} if activity else {}

        queues = [
            {
                "name": name,
                "queued": q.get("queued", 0),
                "delayed": q.get("delayed", 0),
                "pending": q.get("pending", 0),
                "pending_per_consumer": q.get("pending_per_consumer", {}),
                "dead_letters": q.get("dead_letters"),
                "running_here": q.get("running") if i == 0 else None,
                "rates": i == 0,  # the rates and charts are the default queue's
            }
            for i, (name, q) in enumerate(
                queue_readings(info, str(info.get("queue") or _queue_of(None, broker)))
            )
        ]
        workers: list[dict[str, Any]] = []
        listed = info.get("workers")
        if getattr(broker, "distributed", False) and isinstance(listed, list):
            # Distributed brokers: the workers Redis heard from.
            seen = set()
            for w in listed:
                name = str(w.get("consumer"))
                seen.add(name)
                workers.append(self._worker(name, w, records.get(name), now))
            for name, rec in records.items():  # published lately, no heartbeat yet / anymore
                if name not in seen and now - float(rec.get("time", 0)) < 60:
                    workers.append(self._worker(name, {}, rec, now))
        else:  # in-process brokers: their worker actors
            count = len(listed) if isinstance(listed, list) else listed
            for name, rec in records.items():
                workers.append(self._worker(name, {"count": count}, rec, now))
            if not records and count:
                workers.append(self._worker("this process", {"count": count}, None, now))

        running: list[dict[str, Any]] = []
        for name, rec in records.items():
            for r in rec.get("running") or ():
                running.append(
                    {
                        **r,
                        "worker": name,
                        "running_seconds": round(max(0.0, now - float(r["started_at"])), 3),
                    }
                )
        running.sort(key=lambda r: r["started_at"])
        for r in running[:PROGRESS_LOOKUPS]:
            try:
                progress = await broker.result_backend.get_progress(TaskID.parse(r["task_id"]))
            except Exception:  # a bad id in a record, a backend that keeps no progress
                progress = None
            r["progress"] = None if progress is None else _short(progress)

        return {
            "time": now,
            "broker": self.describe(),
            "allow_actions": self.allow_actions,
            "show_payloads": self.show_payloads,
            "refresh_seconds": self.refresh,
            "queues": queues,
            "workers": workers,
            "running": running[:RUNNING_SHOWN],
            "running_total": sum(int(r.get("running_count", 0)) for r in records.values()),
            "activity": {
                "published": bool(records),
                "hint": None
                if records or not listed
                else "No worker published its activity yet. Workers publish what they run "
                "and what failed with bus.activity.ActivityMiddleware: add it to the broker "
                "they run.",
            },
            "failures": [self._failure(f) for f in (activity.failures if activity else ())],
            "dead_letters": await self._dead_letters(),
            "workflows": await self._workflows(info.get("workflows")),
            **self._history(now),
        }

    def _worker(
        self, name: str, beat: dict[str, Any], rec: dict[str, Any] | None, now: float
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "heartbeat_age_seconds": beat.get("heartbeat_age_seconds"),
            "pending": beat.get("pending"),
            "published": rec is not None,
        }
        if "count" in beat:
            out["actors"] = beat["count"]
        if rec is not None:
            out.update(
                host=rec.get("host"),
                pid=rec.get("pid"),
                slot=rec.get("slot"),
                running_count=rec.get("running_count", 0),
                up_seconds=round(max(0.0, now - float(rec.get("started_at", now))), 1),
                record_age_seconds=round(max(0.0, now - float(rec.get("time", now))), 1),
                stats=rec.get("stats"),
            )
        return out

    def _failure(self, f: dict[str, Any]) -> dict[str, Any]:
        return {
            k: f.get(k)
            for k in (
                "time",
                "worker",
                "task_id",
                "task_name",
                "queue",
                "attempt",
                "status",
                "error_type",
                "error",
                "traceback",
                "retrying",
            )
        }

    async def dead_letters(self, limit: int = DEAD_SHOWN) -> list[dict[str, Any]]:
        letters = await self.broker.dead_letters(limit)
        return [self._letter(d) for d in letters]

    async def _dead_letters(self) -> dict[str, Any]:
        try:
            items = await self.dead_letters()
        except NotImplementedError:
            return {"supported": False, "items": [], "requeue": False}
        return {
            "supported": True,
            "items": items,
            "requeue": hasattr(self.broker, "requeue_dead")
            or type(self.broker).requeue_dead_letters is not _base_method("requeue_dead_letters"),
        }

    def _letter(self, d: dict[str, Any]) -> dict[str, Any]:
        out = {k: d.get(k) for k in ("id", "task_name", "task_id", "reason", "deliveries", "time")}
        if self.show_payloads:
            out["payload"] = self._payload(d.get("data"))
        return out

    def _payload(self, data: Any) -> Any:
        if not isinstance(data, bytes) or not data:
            return None
        try:
            m = self.broker.codec.decode_message(data)
        except Exception:
            return {"undecodable": data[:200].decode("utf-8", "replace")}
        return _short(
            {"args": m.args, "kwargs": dict(m.kwargs), "labels": dict(m.labels)}, limit=2000
        )

    async def task(self, task_id: str) -> dict[str, Any]:
        """One task by id: its result (if stored), progress, and where it runs now."""
        try:
            tid = TaskID.parse(task_id.strip())
        except ValueError as exc:
            raise ActionRefused(400, str(exc)) from None
        backend = self.broker.result_backend
        out: dict[str, Any] = {"task_id": str(tid), "result": None}
        try:
            result = await backend.get_result(tid)
        except ResultNotFound:
            pass
        else:
            err = result.error
            r: dict[str, Any] = {
                "status": result.status.value,
                "execution_time": result.execution_time,
                "error": None
                if err is None
                else {"type": err.type_name, "message": err.message, "traceback": err.traceback},
            }
            if self.show_payloads:
                r["return_value"] = _short(result.return_value, 2000)
                r["labels"] = _short(result.labels, 2000)
            out["result"] = r
        try:
            progress = await backend.get_progress(tid)
        except Exception:
            progress = None
        out["progress"] = None if progress is None else _short(progress)
        out["running"] = None
        activity = await read_activity(self.broker, failures=FAILURES_SHOWN)
        for w in activity.workers if activity else ():
            for run in w.get("running") or ():
                if run.get("task_id") == str(tid):
                    out["running"] = {**run, "worker": w.get("worker")}
        out["failures"] = [
            self._failure(f)
            for f in (activity.failures if activity else ())
            if f.get("task_id") == str(tid)
        ]
        out["found"] = bool(out["result"] or out["running"] or out["progress"] or out["failures"])
        return out

    # -------------------------------------------------------------- workflows

    async def _workflows(self, running: Any) -> dict[str, Any]:
        return await list_workflows(self.broker, self._workflows_seen, running)

    async def workflow(self, workflow_id: str) -> dict[str, Any]:
        """One workflow by id: its status and its graph (see ``_workflows``)."""
        try:
            return await one_workflow(self.broker, self._workflows_seen, workflow_id)
        except ValueError as exc:
            raise ActionRefused(400, str(exc)) from None
        except ResultNotFound:
            raise ActionRefused(404, f"no workflow {workflow_id.strip()} (or it expired)") from None

    # ----------------------------------------------------------------- charts

    def _history(self, now: float) -> dict[str, Any]:
        hist = list(self.samples.history)
        depth = [(s.time, float(s.info.get("queued", 0) or 0)) for s in hist]
        delayed = [(s.time, float(s.info.get("delayed", 0) or 0)) for s in hist]
        done: list[tuple[float, float]] = []
        failed: list[tuple[float, float]] = []
        for a, b in itertools.pairwise(hist):
            r = _rates(a, b)
            done.append((b.time, round(r["done"], 2)))
            failed.append((b.time, round(r["failed"], 2)))
        span = self.history
        return {
            "rates": {
                "done_per_second": done[-1][1] if done else None,
                "failed_per_second": failed[-1][1] if failed else None,
            },
            "history": {
                "sample_interval": self.sample_interval,
                "samples": len(hist),
                "error": self.samples.error,
            },
            "charts": {
                "depth": line_chart(
                    "Queue depth",
                    [Series("queued", "#1f6feb", depth), Series("delayed", "#8250df", delayed)],
                    now=now,
                    span=span,
                ),
                "throughput": line_chart(
                    "Attempts per second",
                    [Series("done", "#1a7f37", done), Series("failed", "#cf222e", failed)],
                    now=now,
                    span=span,
                ),
            },
        }

    # ---------------------------------------------------------------- actions

    def _check_action(self, body: Any) -> dict[str, Any]:
        if not self.allow_actions:
            raise ActionRefused(403, "this dashboard is read-only (start it with --allow-actions)")
        if not isinstance(body, dict) or body.get("confirm") is not True:
            raise ActionRefused(400, 'confirm the action: send {"confirm": true}')
        return body

    async def requeue(self, body: Any) -> dict[str, Any]:
        """Requeue dead letters: ``{"confirm": true, "limit": N, "task": name, "reason":
        substring}`` (all but ``confirm`` optional)."""
        body = self._check_action(body)
        limit = body.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ActionRefused(400, "limit must be a whole number from 1 to 10000")
        task, reason = body.get("task"), body.get("reason")
        for name, v in (("task", task), ("reason", reason)):
            if v is not None and not isinstance(v, str):
                raise ActionRefused(400, f"{name} must be a string")
        broker: Any = self.broker
        try:
            if hasattr(broker, "requeue_dead"):
                report = await broker.requeue_dead(limit, reason=reason, task=task)
            elif task is None and reason is None:
                n = await broker.requeue_dead_letters(limit)
                report = [{"outcome": "requeued"}] * n
            else:
                raise ActionRefused(
                    501, f"{type(broker).__name__} cannot requeue by task or reason"
                )
        except NotImplementedError as exc:
            raise ActionRefused(501, str(exc)) from None
        requeued = sum(1 for r in report if r.get("outcome") == "requeued")
        log.info("dashboard.requeued", requeued=requeued, looked_at=len(report))
        return {"requeued": requeued, "report": report}

    async def purge(self, body: Any) -> dict[str, Any]:
        """Delete every dead letter: ``{"confirm": true}``."""
        self._check_action(body)
        try:
            n = await self.broker.purge_dead_letters()
        except NotImplementedError as exc:
            raise ActionRefused(501, str(exc)) from None
        log.info("dashboard.purged", purged=n)
        return {"purged": n}


def _base_method(name: str) -> Any:
    from bus._broker import Broker

    return getattr(Broker, name)
