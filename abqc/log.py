"""Logging of the `abqc` logger: quiet as a library, one call to see what a compile does.

abqc logs through ``logging.getLogger("abqc")`` (and children). As a library it adds no
handler that prints info: by default info lines go nowhere and warnings reach stderr only
through Python's last-resort handler, unless the application configures `logging` (then
they propagate to its handlers as usual). ``abqc.set_verbosity("info")`` adds one handler
to the ``abqc`` logger that writes through ``tqdm.write``, so progress bars and log lines
never break each other (what ``tqdm.contrib.logging.logging_redirect_tqdm`` does for a
block); the command line calls it with "info" (``-q``: "warning").
"""
from __future__ import annotations

import logging
import sys

from .errors import ConfigError

LOGGER_NAME = "abqc"
logger = logging.getLogger(LOGGER_NAME)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: a line printed while a bar is
    shown clears the bar, prints, and redraws it below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001 (logging must never raise into the caller)
            self.handleError(record)


def _level(level: str | int) -> int:
    if isinstance(level, bool):
        level = str(level)
    if isinstance(level, int):
        return level
    if isinstance(level, str) and level.lower() in LEVELS:
        return LEVELS[level.lower()]
    raise ConfigError(f"verbosity {level!r} is not allowed; use one of {list(LEVELS)} "
                      "or a logging level number")


def set_verbosity(level: str | int = "info", stream=None) -> logging.Logger:
    """Show abqc's log lines at `level` ("debug", "info", "warning", "error") and above.

    Adds (once) a handler on the ``abqc`` logger writing ``[abqc] message`` lines to
    `stream` (default: stderr at the time of the call) through ``tqdm.write``; records no
    longer also propagate to the root logger, so an application's own handlers do not print
    them twice. ``set_verbosity("warning")`` quiets it again. Returns the logger."""
    lvl = _level(level)
    handler = next((h for h in logger.handlers if isinstance(h, TqdmHandler)), None)
    if handler is None:
        handler = TqdmHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("[abqc] %(message)s"))
        logger.addHandler(handler)
    elif stream is not None:
        handler.setStream(stream)
    handler.setLevel(lvl)
    logger.setLevel(lvl)
    logger.propagate = False
    return logger


def reset_verbosity() -> None:
    """Back to the library default: no abqc handler, level unset, records propagate."""
    for h in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


class verbosity:
    """``with verbosity("info"): ...``: `set_verbosity` for a block, then the logger's
    previous handlers, level and propagation back (the command line runs inside one, so
    calling `abqc.cli.main` from Python leaves the library's logging as it found it)."""

    def __init__(self, level: str | int = "info", stream=None):
        self.level, self.stream = level, stream

    def __enter__(self) -> logging.Logger:
        self._saved = (list(logger.handlers), logger.level, logger.propagate)
        _level(self.level)  # a bad level raises before anything changes
        for h in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
            logger.removeHandler(h)
        return set_verbosity(self.level, self.stream)

    def __exit__(self, *exc) -> None:
        handlers, level, propagate = self._saved
        for h in list(logger.handlers):
            if h not in handlers:
                h.flush()
                logger.removeHandler(h)
        for h in handlers:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate
