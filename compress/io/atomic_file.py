"""Files that appear whole or not at all: write beside the target, then rename onto it.

``os.replace`` within one directory is atomic on POSIX file systems, so a reader (or a run killed
half-way) sees the old file or the new one, never a part. Every writer of the project that must
not leave a half-written file goes through here:

* :func:`replacing`: a temporary path beside ``path`` for the caller (or a compiler, or
  ``torch.save``) to write; renamed onto ``path`` when the block ends without error, removed when
  it raises.
* :func:`atomic_open`: the same as an open binary file, flushed and fsynced before the rename, so a
  power loss cannot leave the new name pointing at unwritten blocks.
* :func:`temp_dir_beside`: a hidden temporary directory next to ``path``, removed when the block
  ends whatever happens, for outputs of several files that move into place one by one (an ONNX
  model and its external data) or as a whole directory (the demo's output).

Temporary names start with ``.<name of path>.`` (hidden, and easy to tell apart from others).
Whole artifact directories with a lock and a crash-safe swap are :mod:`exporters.artifacts.atomic_dir`.

Example::

    with atomic_open(Path("state.pt")) as f:
        torch.save(state, f)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replacing(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto ``path`` when the block ends without error.

    ``tmp`` names it (a fixed name a later run can find and clean up); by default it is a new,
    empty, uniquely named ``.<name>.XXXXXXXX`` file in ``path``'s directory. When the block raises
    (anything, ``KeyboardInterrupt`` included) the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: Path, tmp: Path | None = None) -> Iterator[BinaryIO]:
    """:func:`replacing` as a binary file open for writing; flushed and fsynced, closed, then
    renamed onto ``path``."""
    with replacing(path, tmp) as target, open(target, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def temp_dir_beside(path: Path, tag: str = "") -> Iterator[Path]:
    """A new private directory ``.<name>.<tag>XXXXXXXX`` in ``path``'s directory (created with its
    parents), removed when the block ends, whatever happens; what the block moved out of it
    stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
