"""A quiet, bar-safe console: known third-party noise is filtered, log lines print above progress bars.

The noise is what every launch prints and nobody can act on: transformers' torchvision probe,
diffusers' "attention backends are experimental", DeepSpeed's INFO lines, and the pipelines'
per-call caption truncation notes (the first one is kept: it says captions are cut). `log.verbose`
turns the filter off.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

#: substrings of log messages that are dropped
DROPPED = (
    "requires torchvision (not installed)",
    "Attention backends are an experimental feature",
)
#: message prefixes shown once per distinct prefix (up to the first colon), at rank 0 only, then dropped
ONCE = ("The following part of your input was truncated because",
        "Token indices sequence length is longer than the specified maximum")
#: Python warnings (message regexes) that are ignored: torchvision's import-time probes, and a
#: deprecated collective that DeepSpeed's ZeRO calls on every rank
IGNORED_WARNINGS = (
    r"Failed to load image Python extension",
    r"The video decoding and encoding capabilities of torchvision are deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
)
#: library loggers that print through their own handlers instead of the root logger's
LIBRARY_LOGGERS = ("transformers", "diffusers")


class NoiseFilter(logging.Filter):
    """Drops known noise; a repeated note (ONCE) passes the first time only, and only on the main
    rank (the other ranks would print the same note again)."""

    def __init__(self, main: bool = True) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._main = main

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in DROPPED):
            return False
        if message.startswith(ONCE):
            key = message.split(":", 1)[0]
            if key in self._seen or not self._main:
                return False
            self._seen.add(key)
        return True


#: the filter `quiet_third_party` installed, re-attached inside `bar_safe_logging`
_active_filter: NoiseFilter | None = None


def _console_loggers() -> list[logging.Logger]:
    """The root logger and the library loggers that have console handlers of their own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger()  # both libraries attach their handler on first use
    transformers_logging.get_logger()
    return [logging.getLogger()] + [logging.getLogger(name) for name in LIBRARY_LOGGERS]


def quiet_third_party(*, verbose: bool, main: bool = True) -> None:
    """Filter known noise unless `verbose`; on other ranks (`main=False`) also drop the libraries'
    loading bars, which only duplicate rank 0's."""
    if not main:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    global _active_filter
    if verbose:
        return
    noise = _active_filter = NoiseFilter(main)
    for logger in _console_loggers():
        for handler in logger.handlers:
            handler.addFilter(noise)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def bar_safe_logging() -> Iterator[None]:
    """Log records and Python warnings go through `tqdm.write`, so that they print above an active
    progress bar instead of being glued to it; the noise filter moves onto tqdm's handlers, which
    replace the console ones without their filters."""
    loggers = _console_loggers()
    logging.captureWarnings(True)
    try:
        with logging_redirect_tqdm(loggers=loggers):
            if _active_filter is not None:
                for logger in loggers:
                    for handler in logger.handlers:
                        handler.addFilter(_active_filter)
            yield
    finally:
        logging.captureWarnings(False)
