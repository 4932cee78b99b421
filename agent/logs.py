"""structlog set-up: one JSON object per line on stderr, with the node id on every line.

Logs go to stderr so that commands printing tables or JSON keep stdout clean.
"""

from __future__ import annotations

import logging as stdlib_logging
import sys

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def configure(node_id: str | None = None, level: str = "info", json_lines: bool = True) -> None:
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if node_id:
        structlog.contextvars.bind_contextvars(node=node_id)
    # pysyncobj and aiohttp log through the standard library: keep their warnings, as one line each.
    stdlib_logging.basicConfig(
        level=max(_LEVELS[level], stdlib_logging.WARNING),
        stream=sys.stderr,
        format='{"event": "%(name)s", "level": "%(levelname)s", "message": "%(message)s"}',
    )
