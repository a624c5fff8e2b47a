"""A block reader that first sleeps a random moment, so that stream workers finish their blocks in
varying order (for ``test_stream_loader``; imported by the worker processes, so it stays light)."""

from __future__ import annotations

import random
import time

from compress.data.stream_source import BlockFiles, RowBlock, Source, Task, read_task


def jittery_read_task(source: Source, task: Task, files: BlockFiles) -> RowBlock:
    time.sleep(random.random() * 0.01)
    return read_task(source, task, files)
