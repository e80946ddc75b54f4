"""Small line charts as inline SVG, drawn on the server (no script, no library).

Only presentation attributes are used (no ``style``), so a strict Content Security
Policy holds; every text is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import attrs

__all__ = ["Series", "line_chart"]


@attrs.frozen
class Series:
    """One line: its legend ``label``, its ``color`` and ``(unix_time, value)`` points."""

    label: str
    color: str
    points: Sequence[tuple[float, float]]


def _nice_max(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n that is >= value (at least 1)."""
    if value <= 1:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(10 * exp)  # pragma: no cover - the loop always returns


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    now: float,
    span: float,
    width: int = 420,
    height: int = 140,
) -> str:
    """An SVG line chart of the last ``span`` seconds up to ``now``."""
    left, right, top, bottom = 44, 10, 22, 20
    pw, ph = width - left - right, height - top - bottom
    start = now - span
    peak = max((v for s in series for t, v in s.points if t >= start), default=0.0)
    ymax = _nice_max(peak)
    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
        f'<text x="{left}" y="14" font-size="12" font-weight="bold" fill="#222">'
        f"{esc(title)}</text>",
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" '
        'stroke="#ccc" stroke-width="1"/>',
    ]
    for frac in (0.5, 1.0):
        y = top + ph * (1 - frac)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
            'stroke="#e4e4e4" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end" '
            f'fill="#666">{esc(_fmt(ymax * frac))}</text>'
        )
    out.append(
        f'<text x="{left - 4}" y="{top + ph + 4}" font-size="10" text-anchor="end" '
        'fill="#666">0</text>'
    )
    minutes = span / 60
    ago = f"-{minutes:.0f} min" if minutes >= 1 else f"-{span:.0f} s"
    out.append(f'<text x="{left}" y="{height - 5}" font-size="10" fill="#666">{esc(ago)}</text>')
    out.append(
        f'<text x="{left + pw}" y="{height - 5}" font-size="10" text-anchor="end" '
        'fill="#666">now</text>'
    )
    lx = left + 8
    for s in series:
        pts = [
            (left + pw * (t - start) / span, top + ph * (1 - min(v, ymax) / ymax))
            for t, v in s.points
            if start <= t <= now
        ]
        if len(pts) == 1:
            x, y = pts[0]
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{esc(s.color)}"/>')
        elif pts:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{esc(s.color)}" '
                'stroke-width="1.5" stroke-linejoin="round"/>'
            )
        label = s.label
        if s.points:
            label += f" ({_fmt(s.points[-1][1])})"
        tx = lx + 14
        out.append(
            f'<line x1="{lx}" y1="{top + 10}" x2="{lx + 10}" y2="{top + 10}" '
            f'stroke="{esc(s.color)}" stroke-width="2"/>'
        )
        out.append(f'<text x="{tx}" y="{top + 14}" font-size="10" fill="#333">{esc(label)}</text>')
        lx = tx + 6 * len(label) + 24
    out.append("</svg>")
    return "".join(out)
