"""Shared helpers for benchmarks: Criteo-shaped models, timing, child-process peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
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


def cli() -> list[str]:
    """The installed ``dqrm-compress`` beside this interpreter (``python -m compress`` without)."""
    script = Path(sys.executable).with_name("dqrm-compress")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "compress"]


def run_job(command: list[str], cwd: Path | None = None) -> tuple[int, str, str, int, float]:
    """Run ``command`` (in ``cwd``, default the project root): ``(exit code, stdout, stderr, peak
    RSS bytes, wall seconds)``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            command, stdout=out, stderr=err, cwd=cwd or Path(__file__).resolve().parents[1]
        )
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (
            code,
            out.read().decode(),
            err.read().decode(),
            usage.ru_maxrss * 1024,
            time.perf_counter() - t0,
        )
