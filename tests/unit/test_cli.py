"""The command line: version and implementation, and errors as one plain sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import spr
from spr.cli import main
from spr.dev import stack as devstack
from spr.errors import ToolMissing


def _spr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_version_names_the_live_implementation() -> None:
    out = _spr("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"spr {spr.__version__} ({spr.IMPL})"


def test_no_extensions_switch_selects_the_pure_twin() -> None:
    out = _spr("--version", env={"SPR_NO_EXTENSIONS": "1"})
    assert out.stdout.strip().endswith("(python)")
    code = "import spr, spr._impl as i; print(spr.IMPL, i.core.__name__)"
    probe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "SPR_NO_EXTENSIONS": "1"},
    )  # fmt: skip
    assert probe.stdout.split() == ["python", "spr._core_py"]


def test_the_compiled_core_is_built_and_live_by_default() -> None:
    # CI builds the extension; a silent fallback to the twin would hide a broken build.
    assert spr.IMPL == "compiled"


def test_spr_error_is_one_sentence_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_up(self: devstack.DevStack) -> None:
        raise ToolMissing("'java' is not installed; install Java 17 and try again")

    monkeypatch.setattr(devstack.DevStack, "up", broken_up)
    assert main(["dev", "up"]) == 2
    err = capsys.readouterr().err
    assert err == "spr dev: 'java' is not installed; install Java 17 and try again\n"


def test_missing_maven_is_named_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no mvn, no java
    with pytest.raises(ToolMissing, match=r"'mvn' is not installed; install Maven"):
        devstack.kafka_libs()


def test_status_json_shape_without_servers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(devstack, "_port_open", lambda *a, **k: False)
    monkeypatch.setenv("SPR_DEV_DIR", str(tmp_path))
    assert main(["dev", "status", "--json"]) == 1
    import json

    status = json.loads(capsys.readouterr().out)
    node = {
        "node": 1,
        "address": devstack.DEFAULT_BOOTSTRAP,
        "controller_port": devstack.CONTROLLER_PORT,
        "roles": ["broker", "controller"],
        "active_controller": False,
        "pid": None,
        "running": False,
    }
    assert status == {
        "kafka": {
            "bootstrap": devstack.DEFAULT_BOOTSTRAP,
            "running": False,
            "brokers": 1,
            "nodes": [node],
        },
        "postgres": {"dsn": devstack.DEFAULT_DSN, "running": False},
    }


def test_kafka_that_dies_during_start_up_reports_the_end_of_its_log(tmp_path: Path) -> None:
    from spr.errors import ServerUnavailable

    stack = devstack.DevStack(tmp_path)
    stack.nodes[0].folder.mkdir(parents=True)
    stack.nodes[0].log.write_text("INFO starting\nERROR Invalid cluster.id in meta.properties\n")
    finished = subprocess.Popen(["true"])
    finished.wait()
    stack.nodes[0].pid_file.write_text(str(finished.pid))
    with pytest.raises(ServerUnavailable, match=r"Invalid cluster\.id") as info:
        stack._wait_kafka(stack.nodes)
    assert "Kafka exited during start-up" in str(info.value)
