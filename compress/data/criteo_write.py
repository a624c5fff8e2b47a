"""Write samples as Criteo raw text (what :mod:`compress.data.criteo_text` reads), for tests and
benchmarks that need large text inputs without downloading Criteo.

:func:`write_criteo_text` writes given labels, integer dense counts and ids (each id as lowercase
hex, so a table of ``R`` rows reads id ``i < R`` back as row ``i``); :func:`write_synthetic_criteo`
writes the one-hot samples of a :class:`~compress.data.synthetic.SyntheticConfig`, their standard
normal dense features ``d`` turned into counts ``max(-1, round(exp(d + 2)) - 3)``, whose ``log3``
transform ``log(x + 3)`` gives back about ``d + 2`` (so the planted signal survives the round
trip, up to rounding of small counts).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from compress.data.synthetic import SyntheticConfig, generate

#: Rows formatted at a time.
_ROWS = 65_536


def write_criteo_text(
    path: str | Path,
    labels: np.ndarray,
    dense: np.ndarray,
    ids: np.ndarray,
    *,
    compress: bool = False,
) -> None:
    """Write ``labels`` [N] (0/1), ``dense`` integer [N, D] and ``ids`` non-negative integer
    [N, F] as N tab-separated lines to ``path`` (gzip-compressed with ``compress``)."""
    n, d = dense.shape
    f = ids.shape[1]
    if labels.shape != (n,) or ids.shape[0] != n:
        raise ValueError("labels, dense and ids must have the same number of rows")
    line = "%d" + "\t%d" * d + "\t%x" * f + "\n"
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="ascii", newline="") as fh:  # type: ignore[operator]
        for start in range(0, n, _ROWS):
            stop = min(n, start + _ROWS)
            rows = np.column_stack(
                [
                    labels[start:stop].astype(np.int64),
                    dense[start:stop].astype(np.int64),
                    ids[start:stop].astype(np.int64),
                ]
            ).tolist()
            fh.write("".join([line % tuple(r) for r in rows]))


def synthetic_counts(dense: np.ndarray) -> np.ndarray:
    """Integer counts for standard normal dense features (see the module docstring)."""
    return np.maximum(-1, np.rint(np.exp(dense.astype(np.float64) + 2.0)) - 3).astype(np.int64)


def write_synthetic_criteo(
    config: SyntheticConfig, path: str | Path, *, compress: bool = False
) -> int:
    """Generate ``config``'s samples and write them as Criteo text; returns the row count.
    Every bag must hold one id (``bag_sizes`` of ones, or none): Criteo text is one-hot."""
    if any(b != 1 for b in config.bags):
        raise ValueError("Criteo text holds one id per feature: use bag_sizes of 1")
    data = generate(config)
    ids = np.column_stack([data.values[f] for f in data.feature_names])
    write_criteo_text(path, data.labels, synthetic_counts(data.dense), ids, compress=compress)
    return len(data)
