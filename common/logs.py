"""One log format for every process, so interleaved output stays readable."""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}


def setup(service: str, level: str = "info") -> logging.Logger:
    logging.basicConfig(
        level=LEVELS.get(level, logging.INFO),
        format=f"%(asctime)s %(levelname)-5s {service}: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    return logging.getLogger(service)
