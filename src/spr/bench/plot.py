"""``spr bench --plot FILE.png``: throughput over time and the latency CDF, as one PNG.

Left: events/s over time (about 40 bins per contender, from each contender's first received message) for
spr and every alternative that ran; the copy_merge ceiling is drawn on its database-only
clock. Then, after a soak, spr's RSS over time; last, the cumulative distribution of
broker-timestamp-to-commit latency from the latency phase (log scale), with p50/p99
marked. Uses matplotlib's Agg backend (no
display needed); matplotlib comes with the ``bench`` extra. Blocks; raises ConfigError
when matplotlib is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spr.bench import report
from spr.errors import ConfigError

__all__ = ["draw"]

_COLOURS = {
    "spr": "#d62728",
    "raw_consume": "#7f7f7f",
    "copy_merge": "#bcbd22",
    "plain_merge": "#7f7f7f",
    "arroyo": "#1f77b4",
    "quix": "#2ca02c",
    "antipattern": "#9467bd",
}


def draw(document: Mapping[str, Any], series: Mapping[str, Any], path: Path) -> None:
    """Draw the report's pictures into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'spr[bench]' (or matplotlib)"
        ) from None

    timelines: Mapping[str, tuple[float | None, Sequence[tuple[float, int]]]] = series.get(
        "timelines", {}
    )
    latencies: Sequence[float] = series.get("latency_ms", [])
    soak_rss: Sequence[tuple[float, float]] = series.get("soak_rss_mb", [])
    panels = int(bool(timelines)) + int(bool(latencies)) + int(bool(soak_rss))
    if panels == 0:
        raise ConfigError("nothing to plot: no contender or latency phase ran")
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
    column = 0
    contenders = document.get("contenders", {})
    if timelines:
        ax = axes[0][column]
        column += 1
        for name, (first_s, timeline) in timelines.items():
            if first_s is None or not timeline:
                continue
            # About 40 bins per contender, whatever its duration, so that a run of a
            # fraction of a second and one of a minute both show their shape.
            duration = max(t for t, _ in timeline) - first_s
            bin_s = min(1.0, max(0.01, duration / 40))
            centres, rates = report.rate_series(timeline, first_s, bin_s=bin_s)
            if not centres:
                continue
            rate = contenders.get(name, {}).get("events_per_s")
            label = name if rate is None else f"{name} ({rate:,.0f}/s)"
            ax.plot(
                centres,
                rates,
                label=label,
                color=_COLOURS.get(name),
                linewidth=2.2 if name == "spr" else 1.2,
                marker="." if len(centres) < 5 else None,
            )
        ax.set_title("throughput over time (same events)")
        ax.set_xlabel("seconds since first message (log)")
        ax.set_ylabel("events/s applied (log)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if soak_rss:
        ax = axes[0][column]
        column += 1
        soak = document.get("soak", {})
        ax.plot([t / 60 for t, _ in soak_rss], [mb for _, mb in soak_rss], color=_COLOURS["spr"])
        warmup = soak.get("rss", {}).get("warmup_s")
        if warmup:
            ax.axvline(warmup / 60, linestyle=":", color="k", alpha=0.6)
            ax.text(warmup / 60, min(mb for _, mb in soak_rss), " end of warm-up", fontsize=8)
        ax.set_title(f"spr RSS at {soak.get('rate', 0):,.0f} events/s (soak)")
        ax.set_xlabel("minutes since spr started")
        ax.set_ylabel("RSS (MB)")
        ax.grid(True, alpha=0.3)
    if latencies:
        ax = axes[0][column]
        ordered = sorted(latencies)
        n = len(ordered)
        ax.plot(ordered, [(i + 1) / n for i in range(n)], color=_COLOURS["spr"])
        latency = document.get("latency", {})
        for key, style in (("p50_ms", ":"), ("p99_ms", "--")):
            value = latency.get(key)
            if value is not None:
                ax.axvline(value, linestyle=style, color="k", alpha=0.6)
                ax.text(value, 0.02, f" {key[:-3]} {value} ms", fontsize=8)
        ax.set_xscale("log")
        ax.set_title(f"spr latency CDF at {latency.get('rate', 0):,.0f} events/s ({n:,} events)")
        ax.set_xlabel("broker timestamp -> database commit (ms)")
        ax.set_ylabel("fraction of events")
        ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
