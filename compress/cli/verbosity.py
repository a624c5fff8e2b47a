"""``--quiet`` and ``--verbose``: what the command line prints besides a command's result.

The library never prints: it logs to the ``compress`` and ``exporters`` loggers (each module's
``logging.getLogger(__name__)``), and progress bars are off unless turned on
(:mod:`compress.progress`). The command line decides what reaches the terminal:

==============  ============================================================================
(default)       progress bars on a terminal; the commands' own lines (plan, fine-tuning steps,
                notes); log records at WARNING and above, as ``warning: <message>``
``--quiet``     no progress bars and no informational lines: warnings, errors and the result
                (the before/after table, ``--json``) only
``--verbose``   also every log record from DEBUG up, with time, level and logger name (each
                stage of the job, each fine-tuning evaluation, what the loader read)
==============  ============================================================================

Errors are one line and an exit code in every mode (:func:`compress.cli.main.main`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import click

from compress import progress

Level = Literal["quiet", "normal", "verbose"]
#: The loggers whose records the command line shows (every module of the two packages).
LOGGERS: tuple[str, ...] = ("compress", "exporters")
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_level: Level = "normal"


class _StderrHandler(logging.Handler):
    """Writes each record as one line to the *current* ``sys.stderr`` (through click, so that a
    test's captured stream or a redirected one receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


class _PlainFormatter(logging.Formatter):
    """``warning: <message>``: the level in lower case, as the commands' own notes read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def level_of(quiet: bool, verbose: bool) -> Level:
    """The level the two flags name (:class:`click.UsageError` for both)."""
    if quiet and verbose:
        raise click.UsageError("give --quiet or --verbose, not both")
    return "quiet" if quiet else "verbose" if verbose else "normal"


def configure(level: Level, progress_bars: bool = True) -> Callable[[], None]:
    """Show the ``compress``/``exporters`` log records and progress bars as ``level`` says
    (module docstring; ``progress_bars=False``: never, as ``--no-progress``). Returns the function
    that puts everything back as it was (``main`` runs it when the command ends, so a process that
    calls it more than once, like the tests, does not stack handlers)."""
    global _level
    handler = _StderrHandler()
    if level == "verbose":
        handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
        threshold = logging.DEBUG
    else:
        handler.setFormatter(_PlainFormatter())
        threshold = logging.WARNING
    handler.setLevel(threshold)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    before = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        # not also through the root logger's handlers (fbgemm_gpu's import calls basicConfig)
        lg.propagate = False
        lg.setLevel(threshold)
    previous_bars = progress.set_enabled(None if progress_bars and level != "quiet" else False)
    previous_level, _level = _level, level

    def undo() -> None:
        global _level
        for lg, (old, propagate) in zip(loggers, before, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)
            lg.propagate = propagate
        progress.set_enabled(previous_bars)
        _level = previous_level

    return undo


def quiet() -> bool:
    """Whether ``--quiet`` was given: commands print no informational lines."""
    return _level == "quiet"


def verbose() -> bool:
    """Whether ``--verbose`` was given: the log records say what the commands' own lines would."""
    return _level == "verbose"
