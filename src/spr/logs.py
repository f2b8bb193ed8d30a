"""Structured logs: one line per operational event, JSON lines on request, secrets redacted.

:func:`log_event` is how spr reports a rebalance, a pause or resume, a circuit change, a
dead letter or an offset gap: an event name plus keyword fields. With
``configure_logging(json=True)`` each record becomes one JSON object per line
(:class:`JsonLinesFormatter`); otherwise a plain ``event key=value`` line.

Redaction is applied twice on purpose: to the fields when the event is logged
(:func:`redact_fields`) and to every formatted line (the formatters run :func:`redact` on
the output), so a DSN that reaches a log through an exception message or some other
module's log call is still masked. Masked values become ``***``.
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any

__all__ = [
    "LOG_EVENTS",
    "REDACTED",
    "JsonLinesFormatter",
    "TextFormatter",
    "configure_logging",
    "is_secret_key",
    "log_event",
    "redact",
    "redact_config",
    "redact_fields",
]

REDACTED = "***"

# The events spr logs with log_event; others are allowed, these are the contract.
LOG_EVENTS: tuple[str, ...] = (
    "rebalance",
    "pause",
    "resume",
    "circuit",
    "dlq",
    "offset_gap",
    "stall",
)

# URL form: scheme://user:password@host -> scheme://user:***@host. A password cannot hold
# an unescaped "@" or whitespace in a URL, so the match stops there.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?=@)")
# Keyword form (libpq "password=... host=..."), query strings (?password=...&) and
# librdkafka-style "sasl.password=..." text; the value may be quoted.
_KEYWORD_SECRET = re.compile(
    r"(?P<head>\b[\w.-]*(?:password|passwd|secret)[\w.-]*[\"']?\s*[=:]\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&,;]+)",
    re.IGNORECASE,
)
# Config keys whose whole value is secret (librdkafka, psycopg and generic names).
_SECRET_KEY = re.compile(
    r"(password|passwd|secret|^sasl\.oauthbearer\.config$|^ssl\.key\.pem$|"
    r"^ssl_key$|token|credential)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with DSN passwords and ``...password=`` / ``...secret=`` values masked.

    ``postgresql://user:pass@host/db`` becomes ``postgresql://user:***@host/db`` and
    ``host=h password='p q' user=u`` becomes ``host=h password=*** user=u``. Never raises.
    """
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    return _KEYWORD_SECRET.sub(lambda m: m.group("head") + REDACTED, text)


def is_secret_key(key: str) -> bool:
    """True for configuration keys whose value must never be shown, such as
    ``sasl.password``, ``sasl.oauthbearer.client.secret``, ``ssl.key.password``."""
    return bool(_SECRET_KEY.search(key))


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a configuration mapping that is safe to log.

    Values of secret keys (:func:`is_secret_key`) become ``***``; other strings pass
    through :func:`redact` (a DSN under an innocent key); nested mappings are handled the
    same way. The input is not modified.
    """
    return {str(k): _redact_value(str(k), v) for k, v in config.items()}


def _redact_value(key: str, value: Any) -> Any:
    if is_secret_key(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return redact_config(value)
    if isinstance(value, (list, tuple)):
        return [_redact_value("", v) for v in value]
    return value


def redact_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Event fields made safe to log: same rules as :func:`redact_config`."""
    return redact_config(fields)


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one operational event (``rebalance``, ``pause``, ``resume``, ``circuit``,
    ``dlq``, ``offset_gap``) with its fields, redacted.

    The JSON formatter puts ``event`` and the fields at the top level of the line; the text
    formatter writes ``event key=value ...``. Never raises for unserialisable fields (they
    are logged with ``str``).
    """
    if not logger.isEnabledFor(level):
        return
    safe = redact_fields(fields)
    text = " ".join([event, *(f"{k}={_text_value(v)}" for k, v in safe.items())])
    logger.log(level, text, extra={"spr_event": event, "spr_fields": safe})


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else _json.dumps(value)
    if isinstance(value, (dict, list, tuple)):
        return _json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


# Attributes every LogRecord has; anything else came in through `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``, then
    ``event`` and its fields for :func:`log_event` records, other ``extra=`` attributes,
    and ``exc`` with the formatted traceback when there is one. Every string is redacted.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        event = getattr(record, "spr_event", None)
        if event is not None:
            line["event"] = event
            fields = getattr(record, "spr_fields", {})
            for key, value in fields.items():
                line.setdefault(key, value)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in ("spr_event", "spr_fields"):
                line.setdefault(key, _redact_value(key, value))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return _json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger message``, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


_HANDLER_MARK = "_spr_configured"


def configure_logging(
    json: bool, *, level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the ``spr`` loggers to ``stream`` (default stderr), as JSON lines or text.

    Replaces a handler installed by an earlier call (so calling it twice does not double
    lines) and leaves every other handler and the root logger alone; ``spr`` records stop
    propagating to the root so they are not printed twice. Returns the handler.
    """
    logger = logging.getLogger("spr")
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if json else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
