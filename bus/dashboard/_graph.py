"""A workflow drawn as an SVG graph, on the server (no script, no library).

Steps are boxes placed by their position in the tree the workflow was written as: a
chain's elements go left to right, a group's top to bottom. Arrows go from each step
to those that wait for it (a chain's element to the next one; every exit of a group
to what follows it). Each box is coloured by its step's state. A large group or a
long chain is drawn in part: its first and last elements and one box that counts the
others by state, so a chord of 10,000 steps is still a small picture.

Only presentation attributes (no ``style``), so a strict Content Security Policy
holds; every text is escaped.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

import attrs

__all__ = ["STATE_COLORS", "workflow_graph"]

#: Fill and text colour of a box, by its step's state.
STATE_COLORS: dict[str, tuple[str, str]] = {
    "pending": ("#f6f8fa", "#57606a"),
    "queued": ("#ddf4ff", "#0550ae"),
    "running": ("#1f6feb", "#ffffff"),
    "succeeded": ("#1a7f37", "#ffffff"),
    "failed": ("#cf222e", "#ffffff"),
    "skipped": ("#eaeef2", "#6e7781"),
    "cancelled": ("#9a6700", "#ffffff"),
}
_UNKNOWN = ("#ffffff", "#24292f")

BOX_W, BOX_H = 132, 36
GAP_X, GAP_Y = 36, 10
MARGIN, LEGEND_H = 8, 26
#: A group or chain of more elements than this is drawn in part.
MOST_SHOWN = 12
#: How many of its first (and last) elements are drawn then.
ENDS_SHOWN = 5


@attrs.define
class _Box:
    """A box to draw: one step (``index``), or the elements left out (``hidden``)."""

    index: int | None
    col: int = 0
    row: int = 0
    hidden: Counter[str] = attrs.Factory(Counter)


@attrs.define
class _Layout:
    boxes: list[_Box] = attrs.Factory(list)
    edges: list[tuple[int, int]] = attrs.Factory(list)  # box number -> box number


def _leaves(node: Any) -> list[int]:
    if isinstance(node, int):
        return [node]
    if isinstance(node, dict) and len(node) == 1:
        ((_, children),) = node.items()
        return [i for c in children for i in _leaves(c)]
    return []


def _place(
    node: Any, col: int, row: int, layout: _Layout, states: list[str]
) -> tuple[int, int, list[int], list[int]]:
    """Place ``node`` with its top left corner at (``col``, ``row``); its width and
    height (in boxes) and its entry and exit boxes."""
    if isinstance(node, int) or not (isinstance(node, dict) and len(node) == 1):
        layout.boxes.append(_Box(node if isinstance(node, int) else None, col, row))
        n = len(layout.boxes) - 1
        return 1, 1, [n], [n]
    ((kind, children),) = node.items()
    children = list(children)
    parts: list[Any] = children
    if len(children) > MOST_SHOWN:
        left_out = children[ENDS_SHOWN:-ENDS_SHOWN]
        hidden = Counter(states[i] for c in left_out for i in _leaves(c) if 0 <= i < len(states))
        parts = [*children[:ENDS_SHOWN], _Box(None, hidden=hidden), *children[-ENDS_SHOWN:]]
    width = height = 0
    entries: list[int] = []
    exits: list[int] = []
    before: list[int] = []
    for k, part in enumerate(parts):
        if isinstance(part, _Box):
            part.col, part.row = (col + width, row) if kind != "group" else (col, row + height)
            layout.boxes.append(part)
            n = len(layout.boxes) - 1
            w, h, ins, outs = 1, 1, [n], [n]
        elif kind != "group":
            w, h, ins, outs = _place(part, col + width, row, layout, states)
        else:
            w, h, ins, outs = _place(part, col, row + height, layout, states)
        if kind != "group":
            layout.edges += [(a, b) for a in before for b in ins]
            before = outs
            if k == 0:
                entries = ins
            exits = outs
            width, height = width + w, max(height, h)
        else:
            entries += ins
            exits += outs
            width, height = max(width, w), height + h
    return max(width, 1), max(height, 1), entries, exits


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def workflow_graph(status: dict[str, Any]) -> str:
    """The workflow whose status is ``status`` (``WorkflowStatus.to_json()``) as SVG."""
    esc = html.escape
    steps: list[dict[str, Any]] = list(status.get("steps") or ())
    states = [str(s.get("state")) for s in steps]
    tree = status.get("tree")
    if tree is None:  # no tree kept: the steps in a row
        tree = {"chain": list(range(len(steps)))}
    layout = _Layout()
    cols, rows, _, _ = _place(tree, 0, 0, layout, states)
    width = 2 * MARGIN + cols * BOX_W + (cols - 1) * GAP_X
    width = max(width, 2 * MARGIN + 90 * len(STATE_COLORS))
    height = LEGEND_H + 2 * MARGIN + rows * BOX_H + (rows - 1) * GAP_Y
    label = f"workflow {status.get('workflow_id', '')} {status.get('state', '')}"

    def x(b: _Box) -> int:
        return MARGIN + b.col * (BOX_W + GAP_X)

    def y(b: _Box) -> int:
        return LEGEND_H + MARGIN + b.row * (BOX_H + GAP_Y)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="workflow-graph" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(label)}">',
        '<defs><marker id="wf-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#8c959f"/></marker>'
        "</defs>",
    ]
    lx = MARGIN
    for state, (fill, _) in STATE_COLORS.items():
        out.append(
            f'<rect x="{lx}" y="6" width="12" height="12" fill="{fill}" stroke="#8c959f" '
            'stroke-width="1"/>'
        )
        out.append(f'<text x="{lx + 16}" y="16" font-size="11" fill="#333">{esc(state)}</text>')
        lx += 90
    boxes = layout.boxes
    for ea, eb in layout.edges:
        ba, bb = boxes[ea], boxes[eb]
        x1, y1 = x(ba) + BOX_W, y(ba) + BOX_H / 2
        x2, y2 = x(bb), y(bb) + BOX_H / 2
        out.append(
            f'<path d="M{x1},{y1:.1f} C{x1 + GAP_X / 2},{y1:.1f} {x2 - GAP_X / 2},{y2:.1f} '
            f'{x2},{y2:.1f}" fill="none" stroke="#8c959f" stroke-width="1.2" '
            'marker-end="url(#wf-arrow)"/>'
        )
    for b in boxes:
        bx, by = x(b), y(b)
        if b.index is not None and 0 <= b.index < len(steps):
            s = steps[b.index]
            state = str(s.get("state"))
            fill, ink = STATE_COLORS.get(state, _UNKNOWN)
            name = str(s.get("task_name"))
            tip = f"step {b.index} ({s.get('position')}): {name}, {state}\n{s.get('task_id')}"
            top = _short(name)
            bottom = state
            dash = ' stroke-dasharray="4 3"' if state == "skipped" else ""
            extra = f' data-step="{b.index}" data-state="{esc(state)}"'
        else:
            fill, ink = _UNKNOWN
            n = sum(b.hidden.values())
            top = f"\u2026 {n} more"
            bottom = ", ".join(f"{c} {s}" for s, c in b.hidden.most_common(2))
            tip = f"{n} steps not drawn: " + ", ".join(
                f"{c} {s}" for s, c in sorted(b.hidden.items())
            )
            dash = ' stroke-dasharray="2 2"'
            extra = ' data-step="more"'
        out.append(f'<g class="step"{extra}><title>{esc(tip)}</title>')
        out.append(
            f'<rect x="{bx}" y="{by}" width="{BOX_W}" height="{BOX_H}" rx="5" fill="{fill}" '
            f'stroke="#57606a" stroke-width="1"{dash}/>'
        )
        out.append(
            f'<text x="{bx + 8}" y="{by + 15}" font-size="11" font-weight="bold" '
            f'fill="{ink}">{esc(top)}</text>'
        )
        out.append(
            f'<text x="{bx + 8}" y="{by + 29}" font-size="10" fill="{ink}">'
            f"{esc(_short(bottom, 22))}</text></g>"
        )
    out.append("</svg>")
    return "".join(out)
