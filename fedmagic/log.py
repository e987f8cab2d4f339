"""``fedmagic.logger``: the logger task code writes to, shown on every node.

Lines go to stderr (INFO lines to stdout once ``%load_ext fedmagic`` ran in a
kernel), except in the context of a task running in a notebook's background:
there they go to the task's own events (its widget shows them), so nothing a
background task logs lands in whatever cell happens to run.
"""

import contextvars
import logging
import sys
from typing import Callable

__all__ = ["info_to_stdout", "log_sink", "logger"]

logger = logging.getLogger("fedmagic")

#: Where fedmagic's log lines go instead of stderr, in the context that sets it.
log_sink: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "fedmagic_log_sink", default=None
)


class _SinkFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        sink = log_sink.get()
        if sink is None:
            return True
        if not getattr(record, "event", False):  # a task's events reach it on their own
            prefix = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
            sink(prefix + record.getMessage())
        return False


class _ConsoleHandler(logging.StreamHandler):
    """stderr, looked up at each line (a kernel swaps it); or stdout for news, in a notebook."""

    info_to_stdout = False

    def emit(self, record: logging.LogRecord) -> None:
        news = self.info_to_stdout and record.levelno < logging.WARNING
        self.stream = sys.stdout if news else sys.stderr
        super().emit(record)


def info_to_stdout() -> None:
    """Print INFO lines to stdout: notebooks paint stderr red, as if each were an error."""
    for handler in logger.handlers:
        if isinstance(handler, _ConsoleHandler):
            handler.info_to_stdout = True


if not logger.handlers:
    _handler = _ConsoleHandler(sys.stderr)
    _handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    )
    _handler.addFilter(_SinkFilter())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
