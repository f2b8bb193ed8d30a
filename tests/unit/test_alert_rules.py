"""The Prometheus rules and the Grafana dashboard in deploy/: valid, tested, and in step
with the metric names of spr.metrics.

promtool comes from Debian's ``prometheus`` package (ci/setup.sh installs it). These
tests do not skip without it: a missing promtool is a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spr.metrics import METRIC_NAMES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "spr-alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "spr-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "spr-dashboard.json"

ALERTS = (
    "SprConsumerLagHigh",
    "SprProcessorLatencyP99High",
    "SprProducerErrorRateHigh",
    "SprPartitionSkewHigh",
    "SprDedupHitRateBelowTarget",
    "SprLagNearRetention",
    "SprOffsetGapSkipped",
    "SprPartitionStalled",
    "SprMisroutedEvents",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (ci/setup.sh does)"
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = _promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    rules = RULES.read_text()
    tests = RULES_TEST.read_text()
    for alert in ALERTS:
        assert f"alert: {alert}" in rules
        cases = re.findall(
            rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\n|\Z)", tests, re.S
        )
        assert any(c.strip() == "[]" for c in cases), f"{alert}: no quiet case"
        assert any("exp_labels" in c for c in cases), f"{alert}: no firing case"


def _copy_tree(tmp_path: Path, rules: str, tests: str) -> Path:
    (tmp_path / "spr-alerts.yml").write_text(rules)
    (tmp_path / "spr-alerts.test.yml").write_text(tests)
    return tmp_path / "spr-alerts.test.yml"


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        # A wrong expectation: the lag alert does not fire at 4 minutes (for: 5m).
        ("tests", "      - eval_time: 4m\n        alertname: SprConsumerLagHigh\n        exp_alerts: []",
         "      - eval_time: 4m\n        alertname: SprConsumerLagHigh\n        exp_alerts:\n"
         "          - exp_labels: {severity: warning, job: spr, instance: a, topic: orders, partition: \"0\"}"),
        # A broken threshold: 50 ms written as 50 s must be caught by the tests.
        ("rules", "spr:processor_latency_seconds:p99_5m > 0.05", "spr:processor_latency_seconds:p99_5m > 50"),
        # The dedup target moved under the "a" job's 90 %: its alert must no longer fire.
        ("rules", "expr: vector(0.95)", "expr: vector(0.85)"),
        # The retention alert without its 80 % threshold fires for partition 1 too.
        ("rules", "max by (topic) (spr_topic_retention_seconds)\n            > 0.8",
         "max by (topic) (spr_topic_retention_seconds)\n            > 0.5"),
        # Skipped events must page even when few: a threshold above the 40 lost misses "a".
        ("rules", "increase(spr_offset_gap_events_total[15m]) > 0",
         "increase(spr_offset_gap_events_total[15m]) > 100"),
        # A stall that pages at once would page for every stall spr recovers by itself.
        ("rules", "expr: spr_stalled_partitions > 0\n        for: 2m", "expr: spr_stalled_partitions > 0\n        for: 0m"),
        # Without the new-series branch, a gap counted before the first scrape ("b") is missed.
        ("rules", "\n            or (spr_offset_gap_events_total > 0 unless spr_offset_gap_events_total offset 15m)", ""),
    ],
)  # fmt: skip
def test_the_unit_tests_can_fail(tmp_path: Path, file: str, old: str, new: str) -> None:
    rules, tests = RULES.read_text(), RULES_TEST.read_text()
    if file == "tests":
        assert old in tests
        tests = tests.replace(old, new)
    else:
        assert old in rules
        rules = rules.replace(old, new)
    out = _promtool("test", "rules", str(_copy_tree(tmp_path, rules, tests)))
    assert out.returncode != 0, out.stdout
    assert "FAILED" in out.stdout + out.stderr


_SERIES = re.compile(r"\bspr_[a-z_]+\b")
_SUFFIXES = ("_bucket", "_sum", "_count")


def _declared(name: str) -> bool:
    if name in METRIC_NAMES:
        return True
    return any(name.endswith(s) and name[: -len(s)] in METRIC_NAMES for s in _SUFFIXES)


def test_rules_use_only_declared_metric_names() -> None:
    text = RULES.read_text() + RULES_TEST.read_text()
    used = set(_SERIES.findall(text))
    unknown = sorted(n for n in used if not _declared(n))
    assert not unknown, unknown
    assert {"spr_consumer_lag", "spr_processor_latency_seconds_bucket"} <= used


def test_dashboard_is_valid_and_covers_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    unknown = sorted({n for e in exprs for n in _SERIES.findall(e) if not _declared(n)})
    assert not unknown, unknown
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("lag", "latency", "throughput", "outcomes", "paused", "skew", "dedup", "circuit",
                  "stalled", "misrouted"):  # fmt: skip
        assert topic in titles, topic
    joined = "\n".join(exprs)
    for name in METRIC_NAMES:
        if name not in ("spr_flush_seconds", "spr_processor_latency_seconds"):
            assert name in joined, f"{name} is on no panel"
    assert "spr_processor_latency_seconds_bucket" in joined and "spr_flush_seconds_bucket" in joined
