"""Tracing: one OpenTelemetry trace from the producer's send to the database commit.

This room is pure: importing it never imports OpenTelemetry. The OpenTelemetry API and
SDK are the optional extra ``spr[otel]``; :mod:`spr.tracing.otel` imports them, and it is
imported only when tracing is turned on (``--otel``, ``Producer(tracing=True)``,
``Engine(tracing=...)``). Without the extra, or with tracing off, spr runs exactly as
before: no header is read on the consumer side, no span is made on the producer side.

What lives here:

* :func:`sampled_traceparent` reads a W3C ``traceparent`` header value and says whether
  its sampled flag is set, without any OpenTelemetry object;
* :class:`TraceLinks` collects, per batch, the trace contexts of the sampled events it
  carries, up to a cap (``max_links``), reading headers only until the cap is reached;
* :func:`require_otel` turns "the extra is not installed" into one sentence.

Spans (see :mod:`spr.tracing.otel`): ``send <topic>`` (kind PRODUCER) per event sent,
its context injected as ``traceparent``/``tracestate`` headers; ``apply batch`` (kind
CONSUMER) per flush, from before the COPY to after COMMIT returns, *linked* (not
parented) to the sampled events' send spans, since one batch carries many traces.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from spr._impl import core
from spr.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_LINKS",
    "INSTALL_HINT",
    "TraceLink",
    "TraceLinks",
    "TracingOptions",
    "otel_installed",
    "require_otel",
    "sampled_traceparent",
]

#: Links per ``apply batch`` span unless configured (``--otel-max-links``).
DEFAULT_MAX_LINKS = 128

INSTALL_HINT = (
    "tracing needs the OpenTelemetry packages, which are not installed; pip install spr[otel]"
)


def otel_installed() -> bool:
    """Whether the OpenTelemetry SDK and its OTLP/HTTP exporter can be imported."""
    try:
        return (
            importlib.util.find_spec("opentelemetry.sdk.trace") is not None
            and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
        )
    except ModuleNotFoundError:
        return False


def require_otel() -> None:
    """Raise :class:`ConfigError` (one sentence: ``pip install spr[otel]``) when the
    OpenTelemetry extra is missing. Never imports OpenTelemetry itself."""
    if not otel_installed():
        raise ConfigError(INSTALL_HINT)


def sampled_traceparent(value: bytes | str | None) -> bool:
    """Whether ``value`` is a well-formed W3C ``traceparent`` with the sampled flag set.

    Format ``VV-TRACEID(32 hex)-SPANID(16 hex)-FLAGS(2 hex)``, lower-case hex; version
    ``ff`` and all-zero ids are invalid. The core's check (compiled, or its twin).
    """
    return bool(core.traceparent_sampled(value))


@dataclass(frozen=True, slots=True)
class TraceLink:
    """The trace context of one sampled event in a batch, and where the event was."""

    traceparent: str
    tracestate: str | None
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, kw_only=True)
class TracingOptions:
    """How the engine traces: at most ``max_links`` links per ``apply batch`` span
    (0: no links, and no header is read); ``collect`` False skips reading headers (the
    sampler records nothing, so links would be thrown away)."""

    max_links: int = DEFAULT_MAX_LINKS
    collect: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_links, bool) or not isinstance(self.max_links, int):
            raise ConfigError(f"--otel-max-links must be a whole number, got {self.max_links!r}")
        if self.max_links < 0:
            raise ConfigError(f"--otel-max-links must be 0 or more, got {self.max_links}")


@dataclass(eq=False)
class TraceLinks:
    """The sampled events' trace contexts of one waiting batch, at most ``cap`` of them.

    :meth:`collect` reads the headers of a ``consume()`` result only while the batch has
    room for more links, so a batch reads at most as many headers as it takes to find
    ``cap`` sampled events (all of them when fewer are sampled). The compiled core reads
    a consumed message's ``traceparent`` straight from librdkafka's header list and
    makes no Python object for an unsampled event (the twin calls ``headers()``, which
    builds a list per message). Not thread-safe: the loop's thread owns it.
    """

    cap: int
    links: list[TraceLink] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.links) >= self.cap

    def collect(self, messages: list[Any]) -> None:
        """Take the sampled ``traceparent`` of ``messages`` (confluent-kafka messages or
        anything with ``headers()``, ``topic()``, ``partition()``, ``offset()``)."""
        links = self.links
        room = self.cap - len(links)
        if room <= 0:
            return
        for parent, state, topic, partition, offset in core.sampled_traces(messages, room):
            links.append(
                TraceLink(
                    traceparent=parent.decode("ascii"),
                    tracestate=None if state is None else state.decode("ascii", "replace"),
                    topic=topic,
                    partition=partition,
                    offset=offset,
                )
            )

    def take(self) -> list[TraceLink]:
        """Hand off the links gathered so far and start over (a new batch)."""
        links, self.links = self.links, []
        return links
