"""Logging set up once at start-up: plain text, or JSON lines on a switch.

No log line carries what callers say or who they are beyond an id: tokens in a
URL (``?token=``) and the values a database error repeats (its ``DETAIL``
line, say an owner and a client id of a unique key) are redacted from every
line, traceback included.
"""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_TOKEN = re.compile(r"([?&]token=)[^&\s\"']+")
_DETAIL = re.compile(r"^(\s*DETAIL:).*$", re.MULTILINE)


def redact(text: str) -> str:
    """``text`` without tokens in URLs nor the row values of a database error's ``DETAIL`` line."""
    return _DETAIL.sub(r"\1 [redacted]", _TOKEN.sub(r"\1[redacted]", text))


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactFilter(logging.Filter):
    """For loggers whose handlers are not ours (gunicorn's): the record's message and traceback redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def configure_logging(level: str = "INFO", json_output: bool = False) -> None:
    """Send every logger's records to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(RedactingJsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(RedactingFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
