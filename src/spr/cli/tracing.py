"""``--otel`` and ``--otel-max-links``: OpenTelemetry tracing on the commands.

``--otel`` installs an SDK tracer provider (OTLP over HTTP/protobuf, configured by the
standard ``OTEL_*`` environment variables) for the command's lifetime, and shuts it
down, exporting what is left, when the command ends. Without the extra ``spr[otel]`` it
is one sentence and exit code 2, before anything is done.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spr.errors import ConfigError
from spr.tracing import DEFAULT_MAX_LINKS, TracingOptions, require_otel

__all__ = ["add_otel_options", "otel_argv", "tracing_options", "tracing_session"]


def add_otel_options(parser: argparse.ArgumentParser, *, links: bool) -> None:
    parser.add_argument(
        "--otel",
        action="store_true",
        help="export OpenTelemetry traces by OTLP/HTTP, configured by the OTEL_* "
        "environment variables (needs pip install spr[otel]; default: off)",
    )
    if links:
        parser.add_argument(
            "--otel-max-links",
            type=int,
            default=None,
            metavar="N",
            help="with --otel: links to the sampled events' send spans per flush span "
            f"(default {DEFAULT_MAX_LINKS}; 0 reads no headers)",
        )


def tracing_options(args: argparse.Namespace) -> TracingOptions | None:
    """The engine's tracing options from ``--otel``/``--otel-max-links`` (None: off).
    Raises ConfigError for a bad value, for ``--otel-max-links`` without ``--otel`` and
    when the extra is missing."""
    max_links = getattr(args, "otel_max_links", None)
    if not args.otel:
        if max_links is not None:
            raise ConfigError("--otel-max-links only applies with --otel")
        return None
    options = TracingOptions(max_links=DEFAULT_MAX_LINKS if max_links is None else max_links)
    require_otel()
    return options


def otel_argv(args: argparse.Namespace) -> list[str]:
    """The tracing flags again, for a worker process."""
    argv = ["--otel"] if args.otel else []
    max_links = getattr(args, "otel_max_links", None)
    if max_links is not None:
        argv += ["--otel-max-links", str(max_links)]
    return argv


@contextmanager
def tracing_session(
    enabled: bool, service_name: str, *, max_links: int | None = None
) -> Iterator[Any]:
    """Tracing set up for the block when ``enabled``, shut down (spans exported) after;
    yields the :class:`spr.tracing.otel.TracingSession` or None. ``max_links``: see
    :func:`spr.tracing.otel.configure`."""
    if not enabled:
        yield None
        return
    require_otel()
    from spr.tracing.otel import configure

    session = configure(service_name, max_links=max_links)
    try:
        yield session
    finally:
        session.shutdown()
