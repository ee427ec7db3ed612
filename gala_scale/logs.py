"""The library's logging: ``logging`` records with time, level and rank, to stderr::

    2026-12-07 08:00:33 INFO gala_scale.epochs: [RANK 0] epoch 1: loss 1.6238, 1.1 s


    log = logs.get_logger(__name__)
    log.info("resuming from %s", checkpoint)                      # the main process only
    log.warning("rank-local problem", main_process_only=False)   # every rank

The logger is Accelerate's ``get_logger`` once the Accelerator exists: its records come from the
main process unless ``main_process_only=False``. Before that (a library function called outside
a run) it is a plain logger. A command's result stays on stdout (``print``): the
results table, ``--get``, ``--help-config``; a failing command's one ``error:`` line on stderr.
"""

from __future__ import annotations

import logging

# Accelerate's adapter puts "[RANK r] " before each message.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: int | str = logging.INFO) -> None:
    """Send the library's records to stderr with time, level and rank (once a process)."""
    root = logging.getLogger("gala_scale")
    if any(getattr(h, "_gala", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._gala = True
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class _Logger(logging.LoggerAdapter):
    """Accelerate's multi-process logger once its state exists; before that (a library call
    outside a run, a test) a plain logger, ``main_process_only`` and ``in_order`` dropped."""

    def __init__(self, name: str) -> None:
        from accelerate.logging import get_logger as accelerate_logger

        super().__init__(logging.getLogger(name), {})
        self._accelerate = accelerate_logger(name)

    def log(self, level, msg, *args, **kwargs):
        from accelerate.state import PartialState

        if PartialState._shared_state:
            self._accelerate.log(level, msg, *args, **kwargs)
            return
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> logging.LoggerAdapter:
    """The logger of ``name`` (under the ``gala_scale`` handler)."""
    return _Logger(name)


__all__ = ["get_logger", "setup"]
