"""Logging set-up: one line per event, PRETTY or NOCOLOR (text) or JSON, as LOG_MODE asks."""

from __future__ import annotations

import json
import logging
import sys
import time

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the first word of a failure message is its stable error code."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        head = message.split(" ", 1)[0]
        if head.isupper() and "_" in head:
            entry["code"] = head
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry)


_COLOURS = {"DEBUG": "\x1b[90m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m"}


class PrettyFormatter(logging.Formatter):
    """Human-readable single lines; exceptions are folded to their last line (no tracebacks for bad input).
    PRETTY colours the level on a terminal (Go's console writer colours it always); NOCOLOR never does."""

    def __init__(self, colour: bool = False) -> None:
        level = "%(levelcolour)s%(levelname)s\x1b[0m" if colour else "%(levelname)s"
        super().__init__(f"%(asctime)s {level} %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        self.colour = colour

    def formatException(self, ei: object) -> str:
        text = super().formatException(ei)  # type: ignore[arg-type]
        return " | " + text.splitlines()[-1] if text else ""

    def format(self, record: logging.LogRecord) -> str:
        if self.colour:
            record.levelcolour = _COLOURS.get(record.levelname, "")
        return super().format(record).replace("\n", " ")


def setup_logging(level: str = "INFO", mode: str = "PRETTY") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if mode == "JSON":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PrettyFormatter(colour=mode == "PRETTY" and sys.stderr.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's access log would double every request line; our metrics middleware logs what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
