"""A waterfall picture of one event's path: its send span and the flush spans linked to it.

Spans are plain dicts as an OTLP receiver decodes them (``name``, ``kind``,
``trace_id``, ``span_id``, ``start_ns``, ``end_ns``, ``links``: a list of dicts with
``trace_id`` and ``span_id``, ``events``: a list of dicts with ``name`` and
``time_ns``). Uses matplotlib's Agg backend (the ``bench`` extra); raises ConfigError
when matplotlib is missing. Blocks while it writes the PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spr.errors import ConfigError

__all__ = ["draw_waterfall", "one_trace"]

Span = Mapping[str, Any]


def one_trace(spans: Sequence[Span], trace_id: str) -> list[Span]:
    """The spans of ``trace_id`` and, after them, the spans that link to any of them,
    ordered by start time within each group."""
    own = sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start_ns"])
    ids = {(s["trace_id"], s["span_id"]) for s in own}
    linked = sorted(
        (
            s
            for s in spans
            if s["trace_id"] != trace_id
            and any((link["trace_id"], link["span_id"]) in ids for link in s.get("links", ()))
        ),
        key=lambda s: s["start_ns"],
    )
    return own + linked


def draw_waterfall(spans: Sequence[Span], path: Path, *, title: str = "") -> None:
    """Draw ``spans`` (see :func:`one_trace`) as horizontal bars on one time axis, in
    milliseconds from the first start; linked spans are hatched and joined to the span
    they link to by an arrow; span events are ticks on their bar."""
    if not spans:
        raise ConfigError("there is no span to draw")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the waterfall needs matplotlib: pip install 'spr[bench]'") from None
    origin = min(s["start_ns"] for s in spans)
    first_trace = spans[0]["trace_id"]
    rows = {(s["trace_id"], s["span_id"]): i for i, s in enumerate(spans)}
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.55 * len(spans)))
    for i, span in enumerate(spans):
        start = (span["start_ns"] - origin) / 1e6
        width = max((span["end_ns"] - span["start_ns"]) / 1e6, 0.02)
        own = span["trace_id"] == first_trace
        axes.barh(
            i,
            width,
            left=start,
            height=0.5,
            color="#4c72b0" if span.get("kind") == "PRODUCER" else "#dd8452",
            hatch=None if own else "//",
            edgecolor="black",
            linewidth=0.5,
        )
        axes.text(start + width, i, f"  {width:.2f} ms", va="center", fontsize=8)
        for event in span.get("events", ()):
            at = (event["time_ns"] - origin) / 1e6
            axes.plot([at, at], [i - 0.3, i + 0.3], color="black", linewidth=1)
            axes.text(at, i - 0.35, event["name"], fontsize=7, ha="center", va="bottom")
        for link in span.get("links", ()):
            target = rows.get((link["trace_id"], link["span_id"]))
            if target is not None:
                source = spans[target]
                axes.annotate(
                    "",
                    xy=(start, i),
                    xytext=((source["end_ns"] - origin) / 1e6, target),
                    arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "grey"},
                )
    labels = [
        f"{s['name']} ({s.get('kind', '').lower()}{'' if s['trace_id'] == first_trace else ', linked'})"
        for s in spans
    ]
    axes.set_yticks(range(len(spans)), labels=labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("milliseconds since the send started")
    axes.set_title(title or f"trace {first_trace[:16]}…", fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
