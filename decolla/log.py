"""structlog set-up shared by every DeColla process: key-value lines, or JSON lines.

Nodes, the CLI and the gateway call `configure`. An application embedding decolla.api
that has not configured structlog gets warnings and errors only, on stderr: the info
lines of its requester (`links measured`, ...) are its to ask for, with
`decolla.log.configure(level="info")` or its own `structlog.configure`, before the
Client starts (its actor processes are forked with the set-up of that moment).
"""
from __future__ import annotations

import logging
import sys

import structlog


def configure(json: bool = False, level: str = "info", **context) -> None:
    """Configure structlog for this process (and the actor processes it forks).

    `context` is bound to every line (e.g. node='dev1', role='device').
    """
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)


def get_logger(name: str):
    """A structlog logger tagged with the component name; lazy, so a module-level logger
    follows a `configure` made after its import (level, renderer, stream)."""
    return structlog.get_logger(component=name)


if not structlog.is_configured():
    configure(level="warning")
