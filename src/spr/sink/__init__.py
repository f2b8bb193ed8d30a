"""Sinks: where consumed batches become durable state (PostgreSQL today)."""

from __future__ import annotations

from spr.sink.postgres import FlushResult, PostgresSink, is_transient, redact_dsn

__all__ = ["FlushResult", "PostgresSink", "is_transient", "redact_dsn"]
