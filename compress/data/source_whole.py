"""A streamable source read whole: every block in order, in this process, into one
:class:`~compress.data.dataset.Dataset` (what ``--stream off`` and small inputs get)."""

from __future__ import annotations

from compress.data.dataset import Dataset
from compress.data.jagged_rows import rows_to_dataset
from compress.data.stream_source import BlockFiles, block_lines, read_task, region_tasks


def read_whole(source) -> Dataset:
    """Every row of an indexed ``source`` (a Parquet or in-process batch source, or any other
    with ``feature_names``, ``num_dense`` and ``dense_transform``) as one :class:`Dataset`."""
    total = int(block_lines(source).sum())
    files = BlockFiles()
    try:
        blocks = [read_task(source, t, files) for t in region_tasks(source, 0, total)]
    finally:
        files.close()
    return rows_to_dataset(blocks, source.feature_names, source.num_dense, source.dense_transform)
