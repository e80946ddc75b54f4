"""The dashboard's page: one HTML document, its stylesheet and its script (the files
in ``static/``, read once at import).

The page carries the first overview as JSON (so it shows everything at once, even to a
reader that runs no script), and the script polls ``api/overview`` every few seconds
and redraws. Every value is put in the page as text (``textContent``); only the charts,
drawn and escaped by the server, are inserted as SVG markup (so is a workflow's graph,
from ``api/workflows/ID``). No inline script or style:
the Content Security Policy forbids both.
"""

from __future__ import annotations

import html
import importlib.resources
import json
from typing import Any

__all__ = ["CSS", "JS", "login_page", "page"]

_STATIC = importlib.resources.files("bus.dashboard") / "static"
CSS = (_STATIC / "dashboard.css").read_text(encoding="utf-8")
JS = (_STATIC / "dashboard.js").read_text(encoding="utf-8")


def page(base: str, data: dict[str, Any], *, logout: bool = False) -> str:
    """The dashboard, showing ``data`` until its script polls; with ``logout``, a
    button that ends the login form's session."""
    blob = json.dumps(data, default=str).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bus dashboard</title>
<base href="{html.escape(base)}">
<link rel="stylesheet" href="static/dashboard.css">
</head>
<body>
<header>
  <h1>bus</h1>
  <span id="broker"></span>
  <span id="mode" class="badge"></span>
  <span id="updated" class="muted"></span>{_LOGOUT if logout else ""}
</header>
<main>
<section id="queues-section">
  <h2>Queues</h2>
  <table id="queues"></table>
  <div id="charts"></div>
</section>
<section id="workers-section">
  <h2>Workers <span id="workers-count" class="count"></span></h2>
  <div class="scroll"><table id="workers"></table></div>
  <p id="activity-hint" class="hint" hidden></p>
</section>
<section id="running-section">
  <h2>Running now <span id="running-count" class="count"></span></h2>
  <div class="scroll"><table id="running"></table></div>
</section>
<section id="workflows-section">
  <h2>Workflows <span id="workflows-count" class="count"></span></h2>
  <div class="scroll"><table id="workflows"></table></div>
  <div id="workflow-view" hidden>
    <h3 id="workflow-title"></h3>
    <div id="workflow-graph" class="scroll"></div>
  </div>
</section>
<section id="failures-section">
  <h2>Recent failures</h2>
  <div class="scroll"><table id="failures"></table></div>
</section>
<section id="dead-section">
  <h2>Dead letters <span id="dead-count" class="count"></span></h2>
  <div id="dead-actions"></div>
  <div id="confirm" class="confirm" hidden>
    <span id="confirm-text"></span>
    <button type="button" id="confirm-yes" class="danger">Yes, do it</button>
    <button type="button" id="confirm-no">Cancel</button>
  </div>
  <p id="action-result" class="hint" hidden></p>
  <div class="scroll"><table id="dead"></table></div>
</section>
<section id="lookup-section">
  <h2>Find a task</h2>
  <form id="lookup">
    <input id="task-id" name="task_id" size="40" placeholder="task id" autocomplete="off">
    <button type="submit">Look up</button>
  </form>
  <pre id="task-result" hidden></pre>
</section>
</main>
<script type="application/json" id="bus-data">{blob}</script>
<script src="static/dashboard.js"></script>
</body>
</html>
"""


_LOGOUT = """
  <form id="logout" method="post" action="logout"><button type="submit">Log out</button></form>"""


def login_page(base: str, *, wrong: bool = False) -> str:
    """The form that asks for the dashboard's token (no script: it works without)."""
    said = '<p id="login-error" class="error">That is not the token.</p>' if wrong else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bus dashboard: log in</title>
<base href="{html.escape(base)}">
<link rel="stylesheet" href="static/dashboard.css">
</head>
<body>
<header><h1>bus</h1></header>
<main class="login">
<section>
  <h2>Log in</h2>
  <p class="hint">This dashboard asks for its token (<code>BUS_DASHBOARD_TOKEN</code>).</p>
  {said}
  <form id="login" method="post" action="login">
    <input id="token" name="token" type="password" size="40" autocomplete="current-password"
      required autofocus aria-label="token">
    <button type="submit">Log in</button>
  </form>
</section>
</main>
</body>
</html>
"""
