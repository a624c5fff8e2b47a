"""Shared helpers for benchmarks: Criteo-shaped models, timing, child-process peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KAGGLE_ROWS = (
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
)  # rows of the 26 Criteo Kaggle tables (dim 16) in facebookresearch/dlrm's preprocessing


def python_child(code: str) -> tuple[float, int, str]:
    """Run a Python snippet in a fresh interpreter (measured through a small wrapper)."""
    # VmHWM (the high-water mark of this address space) is reset by exec, unlike ru_maxrss, which
    # would report the forking parent's size.
    wrapper = (
        "import sys, time, json\n"
        "t0 = time.perf_counter()\n"
        f"exec(compile({code!r}, '<bench>', 'exec'))\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'wall': time.perf_counter() - t0, 'peak': int(hwm) * 1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper], check=True, capture_output=True, text=True
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    return last["wall"], last["peak"], out.stdout


def cache_dir() -> Path:
    d = Path(__file__).parent / ".cache"
    d.mkdir(exist_ok=True)
    return d
