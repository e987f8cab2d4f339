"""``fedmagic.logger``: the logger task code writes to, shown on every node."""

import logging
import sys

__all__ = ["logger"]

logger = logging.getLogger("fedmagic")

if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                            datefmt="%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
