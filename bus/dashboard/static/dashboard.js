"use strict";
(function () {
  var $ = function (id) { return document.getElementById(id); };
  var data = JSON.parse($("bus-data").textContent);
  var pending = null;
  var workflow = null;  // the id of the workflow drawn, redrawn on each refresh

  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) { node.setAttribute(k, attrs[k]); }
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) { continue; }
      node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function fill(table, headers, rows, empty) {
    table.textContent = "";
    var head = el("tr", {});
    headers.forEach(function (h) { head.appendChild(el("th", {}, h)); });
    table.appendChild(el("thead", {}, head));
    var body = el("tbody", {});
    if (!rows.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: headers.length, "class": "empty" }, empty)));
    }
    rows.forEach(function (r) { body.appendChild(r); });
    table.appendChild(body);
  }

  function shown(value) {
    return value === null || value === undefined ? "-" : value;
  }

  function num(field, value) {
    return el("td", { "class": "num", "data-field": field }, shown(value));
  }

  function span(seconds) {
    if (seconds === null || seconds === undefined) { return "-"; }
    if (seconds < 60) { return seconds.toFixed(1) + " s"; }
    if (seconds < 3600) { return (seconds / 60).toFixed(1) + " min"; }
    return (seconds / 3600).toFixed(1) + " h";
  }

  function tid(id) {  // the random tail of a task id; click it to look the task up
    if (!id) { return "-"; }
    return el("code", { "class": "id", title: id + " (click to look it up)", "data-id": id },
      "\u2026" + id.slice(-12));
  }

  function when(unix) {
    return unix ? new Date(unix * 1000).toLocaleTimeString() : "-";
  }

  function progress(p) {
    if (p === null || p === undefined) { return "-"; }
    if (typeof p === "number" && p >= 0 && p <= 1) {
      return el("span", {}, el("progress", { value: p, max: 1 }), " " + Math.round(p * 100) + "%");
    }
    return typeof p === "string" ? p : JSON.stringify(p);
  }

  function render(d) {
    data = d;
    var b = d.broker;
    $("broker").textContent = b.type + (b.url ? " " + b.url : "") + " / queue " + b.queue +
      (b.signed ? " (signed)" : "");
    $("mode").textContent = d.allow_actions ? "actions allowed" : "read-only";
    $("mode").className = "badge" + (d.allow_actions ? " actions" : "");
    $("updated").textContent = "updated " + when(d.time);

    fill($("queues"), ["Queue", "Queued", "Delayed", "Pending", "Dead letters", "Done/s", "Failed/s"],
      d.queues.map(function (q) {
        var per = Object.keys(q.pending_per_consumer || {}).map(function (c) {
          return c + ": " + q.pending_per_consumer[c];
        }).join(", ");
        return el("tr", { "data-queue": q.name },
          el("td", {}, el("code", {}, q.name)),
          num("queued", q.queued), num("delayed", q.delayed),
          el("td", { "class": "num", "data-field": "pending", title: per }, shown(q.pending)),
          num("dead_letters", q.dead_letters),
          num("done_per_second", q.rates === false ? null : d.rates.done_per_second),
          num("failed_per_second", q.rates === false ? null : d.rates.failed_per_second));
      }), "no queue");
    $("charts").innerHTML = d.charts.depth + d.charts.throughput;  // SVG drawn and escaped by the server

    $("workers-count").textContent = "(" + d.workers.length + ")";
    fill($("workers"), ["Worker", "Host / pid", "Heartbeat", "Pending", "Running", "Done", "Failed", "Up"],
      d.workers.map(function (w) {
        var st = w.stats || {};
        return el("tr", { "data-worker": w.name },
          el("td", {}, el("code", {}, w.name)),
          el("td", {}, w.host ? w.host + " / " + w.pid + (shown(w.slot) === "-" ? "" : " (slot " + w.slot + ")") : "-"),
          el("td", { "data-field": "heartbeat" },
            shown(w.heartbeat_age_seconds) === "-" ? "-" : span(w.heartbeat_age_seconds) + " ago"),
          num("pending", w.pending),
          num("running", w.published ? w.running_count : null),
          num("done", w.published ? st.succeeded : null),
          num("failed", w.published ? (st.failed || 0) + (st.timed_out || 0) : null),
          el("td", {}, w.published ? span(w.up_seconds) : "-"));
      }), "no live worker");
    var hint = $("activity-hint");
    hint.hidden = !d.activity.hint;
    hint.textContent = d.activity.hint || "";

    $("running-count").textContent = "(" + d.running_total + ")";
    fill($("running"), ["Task", "Id", "Attempt", "Worker", "For", "Progress"],
      d.running.map(function (r) {
        return el("tr", { "data-task-id": r.task_id },
          el("td", {}, r.task_name), el("td", {}, tid(r.task_id)),
          num("attempt", r.attempt), el("td", {}, el("code", {}, r.worker)),
          el("td", {}, span(r.running_seconds)), el("td", { "data-field": "progress" }, progress(r.progress)));
      }), "nothing runs now");

    var wfs = d.workflows || { running: null, items: [] };
    $("workflows-count").textContent = "(" + shown(wfs.running) + " running)";
    fill($("workflows"), ["Workflow", "First task", "State", "Steps", "By state"],
      wfs.items.map(function (w) {
        var by = Object.keys(w.step_states).map(function (k) { return w.step_states[k] + " " + k; });
        return el("tr", { "data-workflow-id": w.workflow_id },
          el("td", {}, el("code", { "class": "id", title: w.workflow_id + " (click to draw it)",
            "data-workflow": w.workflow_id }, "\u2026" + w.workflow_id.slice(-12))),
          el("td", {}, shown(w.first_task)),
          el("td", { "class": "wf-" + w.state, "data-field": "state" }, w.state),
          num("steps", w.steps), el("td", {}, by.join(", ")));
      }), "no workflow lately");

    fill($("failures"), ["When", "Task", "Id", "Attempt", "Error", ""],
      d.failures.map(function (f) {
        var error = el("details", {}, el("summary", { "class": "error" }, f.error_type + ": " + f.error),
          el("pre", {}, f.traceback || "(no traceback)"));
        return el("tr", { "data-task-id": f.task_id },
          el("td", {}, when(f.time)), el("td", {}, f.task_name || "?"),
          el("td", {}, tid(f.task_id)),
          num("attempt", f.attempt), el("td", {}, error),
          el("td", {}, f.retrying ? "retrying" : f.status));
      }), "no failure lately");

    var dead = d.dead_letters;
    var count = shown(d.queues[0].dead_letters);
    $("dead-count").textContent = dead.supported ? "(" + (count === "-" ? dead.items.length : count) + ")" : "";
    var actions = $("dead-actions");
    actions.textContent = "";
    if (d.allow_actions && dead.supported && dead.items.length) {
      if (dead.requeue) {
        actions.appendChild(el("button", { type: "button", id: "requeue-all" },
          "Requeue " + dead.items.length + "\u2026"));
        actions.appendChild(document.createTextNode(" "));
      }
      actions.appendChild(el("button", { type: "button", id: "purge-all", "class": "danger" },
        "Purge all\u2026"));
    }
    var headers = ["Id", "Task", "Task id", "Reason", "Deliveries", "When"];
    if (d.show_payloads) { headers.push("Payload"); }
    fill($("dead"), headers, dead.items.map(function (x) {
      var row = el("tr", { "data-dead-id": x.id },
        el("td", {}, el("code", {}, x.id)), el("td", {}, x.task_name || "?"),
        el("td", {}, tid(x.task_id)),
        el("td", { "data-field": "reason" }, x.reason), num("deliveries", x.deliveries),
        el("td", {}, when(x.time)));
      if (d.show_payloads) { row.appendChild(el("td", {}, el("code", {}, JSON.stringify(x.payload)))); }
      return row;
    }), dead.supported ? "no dead letter" : "this broker keeps no dead letters");
  }

  function draw(id) {
    workflow = id;
    return fetch("api/workflows/" + encodeURIComponent(id), { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) { return r.json().then(function (body) { return [r, body]; }); })
      .then(function (rb) {
        $("workflow-view").hidden = false;
        if (!rb[0].ok) {
          $("workflow-title").textContent = "workflow \u2026" + id.slice(-12) + ": " + (rb[1].error || rb[0].statusText);
          $("workflow-graph").textContent = "";
          return;
        }
        var w = rb[1];
        $("workflow-title").textContent = "workflow " + w.workflow_id + ": " + w.state +
          (w.failed_step === null ? "" : " (step " + w.failed_step + " failed)");
        $("workflow-graph").innerHTML = w.graph;  // SVG drawn and escaped by the server
      })
      .catch(function (e) { $("workflow-title").textContent = "cannot draw the workflow: " + e.message; });
  }

  function refresh() {
    if (workflow) { draw(workflow); }
    return fetch("api/overview", { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) { return r.json().then(function (body) { return [r, body]; }); })
      .then(function (rb) {
        if (rb[0].status === 401) { location.reload(); return; }  // the login form again
        if (!rb[0].ok) { throw new Error(rb[1].error || rb[0].statusText); }
        render(rb[1]);
      })
      .catch(function (e) { $("updated").textContent = "cannot refresh: " + e.message; });
  }

  function ask(text, action) {
    pending = action;
    $("confirm-text").textContent = text;
    $("confirm").hidden = false;
  }

  function say(text, bad) {
    var p = $("action-result");
    p.hidden = false;
    p.className = bad ? "hint error" : "hint";
    p.textContent = text;
  }

  function post(url, body) {
    var init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    return fetch(url, init)
      .then(function (r) { return r.json().then(function (b) { return [r, b]; }); });
  }

  $("dead-actions").addEventListener("click", function (ev) {
    var id = ev.target && ev.target.id;
    var n = data.dead_letters.items.length;
    if (id === "requeue-all") {
      ask("Requeue " + n + " dead letter(s)? They run again.", function () {
        return post("api/dead/requeue", { confirm: true, limit: n }).then(function (rb) {
          say(rb[0].ok ? "requeued " + rb[1].requeued + " dead letter(s)" : rb[1].error, !rb[0].ok);
        });
      });
    } else if (id === "purge-all") {
      ask("Delete every dead letter? This cannot be undone.", function () {
        return post("api/dead/purge", { confirm: true }).then(function (rb) {
          say(rb[0].ok ? "purged " + rb[1].purged + " dead letter(s)" : rb[1].error, !rb[0].ok);
        });
      });
    }
  });
  $("confirm-yes").addEventListener("click", function () {
    var action = pending;
    pending = null;
    $("confirm").hidden = true;
    if (action) { action().then(refresh); }
  });
  $("confirm-no").addEventListener("click", function () {
    pending = null;
    $("confirm").hidden = true;
  });

  function lookup(id) {
    var out = $("task-result");
    fetch("api/tasks/" + encodeURIComponent(id), { headers: { Accept: "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (body) { out.hidden = false; out.textContent = JSON.stringify(body, null, 2); })
      .catch(function (e) { out.hidden = false; out.textContent = String(e); });
  }

  $("lookup").addEventListener("submit", function (ev) {
    ev.preventDefault();
    lookup($("task-id").value.trim());
  });
  document.addEventListener("click", function (ev) {
    var wf = ev.target && ev.target.getAttribute && ev.target.getAttribute("data-workflow");
    if (wf) {
      draw(wf);
      return;
    }
    var id = ev.target && ev.target.getAttribute && ev.target.getAttribute("data-id");
    if (id) {
      $("task-id").value = id;
      lookup(id);
      $("lookup-section").scrollIntoView();
    }
  });

  render(data);
  setInterval(refresh, Math.max(1, data.refresh_seconds || 2) * 1000);
})();
