"""The dashboard in a real browser: headless Chromium logs in to a dashboard that
asks for a token, loads its page with a live worker on Redis, and a requeue is clicked
in the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import bus
from bus.dashboard import serve
from tests.observability.browser import chromium_or_skip, open_browser
from tests.observability.redis_app import make_broker
from tests.observability.support import eventually
from tests.redis.server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def q(selector: str) -> str:
    """JS: the trimmed text of the first element matching ``selector`` (or null)."""
    return f"document.querySelector({json.dumps(selector)})?.textContent.trim() ?? null"


TOKEN = "browser-test-token-0123456789"


async def test_the_page_shows_the_queue_a_worker_and_a_dead_letter_and_requeues_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    chromium_or_skip()
    prefix = f"b{bus.TaskID.new()[-12:]}"
    worker_broker = make_broker(redis_server.url, prefix)
    broker = make_broker(redis_server.url, prefix)
    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            await nursery.start(worker_broker.run_worker, 2)
            consumer = worker_broker.settings.consumer
            t = broker.tasks
            once = await t["once"].kiq("k1")  # fails the first time: a dead letter
            assert (await once.wait_result()).is_err
            holds = [await t["hold"].kiq(i) for i in range(2)]  # the worker's 2 slots

            async def holding() -> bool:
                return all([await h.get_progress() for h in holds])

            await eventually(holding)
            for i in range(3):  # stay queued behind the holds
                await t["ok"].kiq(i)
            urls = await nursery.start(
                lambda task_status: serve(
                    broker, port=0, allow_actions=True, sample_interval=0.5,
                    token=TOKEN, task_status=task_status,
                )
            )  # fmt: skip
            async with open_browser(tmp_path / "profile") as browser:
                page = await browser.new_page()
                await page.goto(urls[0] + "/")
                # The token first: the login form, and nothing of the queue yet.
                assert await page.evaluate("!!document.getElementById('login')")
                assert await page.evaluate("!document.getElementById('bus-data')")
                await page.type("#token", "not-the-token")
                await page.click("#login button")
                await page.wait_for("!!document.getElementById('login-error')")
                # The form of the refusal, with an empty field (what was typed before
                # must not be typed into: that would be a wrong token again).
                await page.wait_for(
                    "document.getElementById('token') && "
                    "document.getElementById('token').value === ''"
                )
                await page.type("#token", TOKEN)
                await page.click("#login button")
                await page.wait_for("!!document.getElementById('bus-data')")
                # The session cookie is out of the script's reach, and it is what
                # opens the API: the same request without it is refused.
                assert await page.evaluate("document.cookie") == ""
                without = "fetch('api/overview', {credentials: 'omit'}).then(r => r.status)"
                assert await page.evaluate(without) == 401
                # What a person sees: the queue's depth, the live worker, the letter.
                await page.wait_for(f"{q('tr[data-queue=q] [data-field=queued]')} === '3'")
                assert await page.evaluate(q(f"tr[data-worker='{consumer}'] code")) == consumer
                running = await page.evaluate(
                    q(f"tr[data-worker='{consumer}'] [data-field=running]")
                )
                assert running == "2"
                reason = await page.evaluate(q("#dead tr[data-dead-id] [data-field=reason]"))
                assert "failed for good" in reason
                assert await page.evaluate(q("#running tr[data-task-id] [data-field=progress]"))

                await page.click("#requeue-all")
                await page.wait_for("!document.getElementById('confirm').hidden")
                await page.click("#confirm-yes")
                said = await page.wait_for(
                    "document.getElementById('action-result').textContent || null"
                )
                assert said == "requeued 1 dead letter(s)"
                assert await broker.dead_letters() == []
                await page.wait_for(q("#dead td.empty") + " === 'no dead letter'")
                # A task by id, typed into the form.
                await page.type("#task-id", str(holds[0].task_id))
                await page.click("#lookup button")
                found = json.loads(await page.wait_for(q("#task-result")))
                assert found["running"]["worker"] == consumer
                assert found["progress"] == {"step": "holding", "n": 0}
                # Log out: the login form again, and the API refuses the page.
                await page.click("#logout button")
                await page.wait_for("!!document.getElementById('login')")
                status = "fetch('api/overview').then(r => r.status)"
                assert await page.evaluate(status) == 401
            for h in holds:
                await h.cancel()

            async def ran_again() -> bool:
                return (await once.get_result()).status is bus.TaskStatus.SUCCESS

            await eventually(ran_again)  # the requeued letter ran once the slots were free
            nursery.cancel_scope.cancel()
