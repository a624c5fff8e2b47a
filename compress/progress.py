"""Progress bars for long work: the command line draws them with tqdm on a terminal, silent when
output is piped, with ``--json``, ``--quiet`` or ``--no-progress``.

They are off until :func:`set_enabled` is called: the Python API (``compress.pipeline``,
``compress.run``) prints nothing and reports through :mod:`logging` instead; the command line
turns them on for a terminal (``set_enabled(None)``). tqdm is imported when a bar is drawn, not
with this module (the command line imports it for ``--no-progress``, and ``--help`` should not pay
for tqdm).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_enabled: bool | None = False  # off: the Python API draws nothing


def set_enabled(enabled: bool | None) -> bool | None:
    """Force progress bars on or off; ``None``: on when stderr is a terminal (and ``CI`` is not
    set), what the command line uses. Returns the previous setting (to restore it)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", **kwargs) -> Iterator[T]:
    """``items`` wrapped in a progress bar on stderr when progress is enabled."""
    if not enabled():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


def byte_bar(total: int, desc: str = ""):
    """A progress bar on stderr counting ``total`` bytes (``update(n)``, ``close()``), or ``None``
    when progress is disabled."""
    if not enabled():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, dynamic_ncols=True)
