"""The shape of the source tree: the public surface, the import graph and room sizes.

These are the structure's promises (the architecture issue, docs/architecture.md): the
documented names keep importing, importing a pure room loads no client library, only
the command line and the benchmark reach into the dev stack, no two modules import each
other in a loop, and no room grows past what one reader holds in mind.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import import_module, metadata
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "spr"

PUBLIC_NAMES = [
    ("spr", "Producer"),
    ("spr", "IMPL"),
    ("spr", "__version__"),
    ("spr.routing", "partition_for"),
    ("spr.routing", "partition_key"),
    ("spr.routing", "murmur2"),
    ("spr.routing", "route_many"),
    ("spr.dedup", "IdempotencyRing"),
    ("spr.decode", "decode_event"),
    ("spr.batch", "Batch"),
    ("spr.sink.postgres", "PostgresSink"),
    ("spr.sink", "PostgresSink"),
    ("spr.engine", "Engine"),
    ("spr.engine", "StatePipeline"),
    ("spr.engine", "EngineStats"),
    ("spr.engine", "FlushFailed"),
    ("spr.config", "EngineConfig"),
    ("spr.config", "TableMapping"),
    ("spr.config", "load_engine_config"),
    ("spr.dlq", "DeadLetterWriter"),
    ("spr.dlq", "dead_letter_sink"),
    ("spr.metrics", "SprMetrics"),
    ("spr.metrics", "serve"),
    ("spr.kafka", "KafkaAdmin"),
    ("spr.errors", "SprError"),
]


@pytest.mark.parametrize(("module", "name"), PUBLIC_NAMES, ids=lambda v: str(v))
def test_every_documented_public_name_imports(module: str, name: str) -> None:
    assert getattr(import_module(module), name) is not None


def test_everything_in_spr_all_exists_and_the_console_script_resolves() -> None:
    import spr

    for name in spr.__all__:
        assert getattr(spr, name) is not None, name
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "spr"]
    assert script.value == "spr.cli:main" and callable(script.load())


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_pure_rooms_load_no_client_library() -> None:
    loaded = _modules_after("import spr, spr.routing, spr.dedup, spr.decode, spr.config")
    assert not {m for m in loaded if m.startswith(("confluent_kafka", "psycopg"))}
    assert not {m for m in loaded if m.startswith("spr.dev")}


def test_opentelemetry_is_imported_only_when_tracing_is_on() -> None:
    """The extra ``spr[otel]`` is optional: the engine, the producer and the commands
    load none of it until tracing is turned on, and only spr.tracing.otel imports it."""
    loaded = _modules_after(
        "import spr, spr.engine, spr.producer, spr.tracing, spr.cli, spr.cli.run, "
        "spr.cli.produce, spr.cli.transform, spr.transform, spr.engine.flushing, "
        "spr.engine.intake"
    )
    assert not {m for m in loaded if m.startswith("opentelemetry")}
    importers = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "opentelemetry" or n.startswith("opentelemetry.") for n in names):
                importers.add(str(path.relative_to(SRC)))
    assert importers == {"tracing/otel.py"}


def _imports(path: Path) -> set[str]:
    """The spr modules one source file imports, anywhere in it (lazy imports count)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spr")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("spr"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }
    return {
        name: {m for m in _imports(path) if m in files} - {name} for name, path in files.items()
    }


def test_only_the_command_line_and_the_benchmark_import_the_dev_stack() -> None:
    importers = {
        name
        for name, deps in _graph().items()
        if any(d == "spr.dev" or d.startswith("spr.dev.") for d in deps)
    }
    allowed = ("spr.cli", "spr.bench", "spr.dev")
    assert {n for n in importers if not n.startswith(allowed)} == set()


def test_no_import_cycle() -> None:
    graph = _graph()
    # Importing a package runs its __init__: an edge to spr.x.y is an edge to spr.x too,
    # unless the importer is inside spr.x (then that __init__ is already running).
    for node, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            parents = {".".join(parts[:i]) for i in range(2, len(parts))} & graph.keys()
            deps |= {p for p in parents if node != p and not node.startswith(p + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):
                continue  # a package's __init__ re-exporting its own rooms
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_rooms_stay_small() -> None:
    too_big = []
    for path in SRC.rglob("*"):
        if path.suffix not in (".py", ".pyx", ".pxi", ".pxd"):
            continue
        lines = path.read_text().count("\n")
        limit = 600 if path.suffix == ".py" else 500
        if lines > limit:
            too_big.append(f"{path.relative_to(SRC)}: {lines} lines")
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > 400:
                        too_big.append(f"{path.relative_to(SRC)}: class {node.name} {length}")
    assert too_big == []


def test_the_engine_reads_time_only_through_its_clock() -> None:
    offenders = []
    for path in (SRC / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "time"
                and node.attr in ("monotonic", "time", "perf_counter", "sleep")
            ):
                offenders.append(f"{path.name}:{node.lineno} time.{node.attr}")
    assert offenders == []
