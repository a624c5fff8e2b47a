"""Wall time per stage of the main job (the ``timings`` object of ``dqrm-compress --json``).

    >>> timer = StageTimer()
    >>> with timer("load"):
    ...     job = pipeline.load("demo/dlrm.pt")
    >>> timer.seconds  # {"load": 0.41}

A stage entered twice adds up. Timings are reported, never written into artifacts (those must be
byte-identical for identical inputs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    """Seconds spent in each named stage, in the order stages were first entered."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` more for ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """The timings in whole milliseconds, rounded down (so that they never add up to more
        than the total they are part of)."""
        return {k: math.floor(v * 1000) / 1000 for k, v in self.seconds.items()}
