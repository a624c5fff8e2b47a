"""Compiled quantization kernels for the QAT hot path and for conversion, with the PyTorch path
as reference.

A QAT step fake-quantizes the rows it gathers. In PyTorch that is a dozen small tensor ops (a
row-wise ``aminmax`` over 16 values a row is the slowest of them), which cost more than the
embedding lookup itself. ``fake_quant_kernels.c`` does the same arithmetic in one pass over the
rows; :func:`fake_quantize_rowwise_` and :func:`fake_quantize_tablewise_` give the same values as
:func:`compress.quant.fake_quant.fake_quantize_rowwise_` / ``fake_quantize_tablewise_`` (tested
bit-exact against FBGEMM and against those functions).

Conversion quantizes whole tables chunk by chunk. :func:`rowwise_quantize_into` and
:func:`tablewise_quantize_into` write a chunk's packed codes (and row-wise scales and biases) in
one pass over its rows, the bytes of :func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`
and :func:`compress.quant.tablewise.tablewise_quantize_packed` (which use them when they can; a
row whose minimum is zero takes FBGEMM's sign of that zero at no extra cost).

The C file is compiled once with the system C compiler (``$CC``, default ``cc``) into
``$DQRM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dqrm-compress`` or ``~/.cache/dqrm-compress``),
named by a hash of the source, flags and machine, written to a temporary file and renamed, and
loaded with ``ctypes`` (no PyTorch headers, so it builds in well under a second). ``make setup``
builds it. Where it cannot be built (no compiler, one without ``_Float16``) or ``DQRM_NATIVE=0``,
QAT and conversion use the PyTorch functions, which give the same values more slowly, and says so once with a
``RuntimeWarning`` naming the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from compress.io.atomic_file import replacing
from compress.quant import fake_quant

_log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fake_quant_kernels.c")
#: IEEE float32 arithmetic, no FMA contraction: the values must equal PyTorch's op by op.
#: ``-fno-trapping-math`` (no FP exceptions are ever unmasked) lets the clamps vectorize, and
#: ``-fno-math-errno`` the square roots of the L2 range search (never of a negative number); they
#: change no result.
CFLAGS = (
    "-O3",
    "-std=c11",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-trapping-math",
    "-fno-math-errno",
)
ENV_SWITCH = "DQRM_NATIVE"
ENV_CACHE = "DQRM_CACHE_DIR"


class NativeUnavailable(RuntimeError):
    """The compiled kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where the compiled library is kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dqrm-compress"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def find_compiler() -> str | None:
    """The C compiler's executable (``$CC``, default ``cc``, looked up on ``PATH`` unless it is a
    path), or ``None`` when there is none: then the kernels cannot be built here."""
    return shutil.which(_compiler())


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def arch_flags() -> tuple[str, ...]:
    """``-mf16c`` on x86-64 CPUs that have it: hardware fp16 rounding (without it GCC calls a
    software routine twice a row, which costs more than the rest of the kernel)."""
    if platform.machine().lower() in ("x86_64", "amd64") and "f16c" in _cpu_flags():
        return ("-mf16c",)
    return ()


def _flags() -> tuple[str, ...]:
    return (*CFLAGS, *arch_flags())


def library_path() -> Path:
    """The library's path: a hash of source, compiler, flags and machine names the file."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join((_compiler(), *_flags(), platform.machine(), platform.system())).encode())
    return cache_dir() / f"fake_quant_kernels-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the kernels if they are not in the cache yet; the library's path.

    Raises:
        NativeUnavailable: no compiler, or the compiler failed (its message is included).
    """
    out = library_path()
    if out.exists():
        return out
    if find_compiler() is None:
        raise NativeUnavailable(f"no C compiler found ({_compiler()!r}; set CC or install one)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a concurrent build replaces it with identical bytes
    with replacing(out) as tmp:
        cmd = [_compiler(), *_flags(), "-o", str(tmp), str(SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise NativeUnavailable(f"cannot run the C compiler {cmd[0]!r}: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise NativeUnavailable(
                f"{cmd[0]} failed on {SOURCE.name}: " + (detail[-1] if detail else "no output")
            )
    return out


def load() -> ctypes.CDLL:
    """Build (if needed) and load the kernels, with their argument types declared."""
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load the compiled kernels: {exc}") from None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    signatures = {
        "dqrm_fq_rowwise": ((ptr, i64, i64, i32), None),
        "dqrm_fq_tablewise": ((ptr, i64, ctypes.c_float, i32), None),
        "dqrm_blocks_build": ((ptr, i64, i64, i64, ptr, ptr, ptr), None),
        "dqrm_blocks_rescan": ((ptr, i64, i64, i64, ptr, ptr, ptr), i64),
        "dqrm_blocks_update": ((ptr, i64, i64, ptr, i64, ptr, ptr, ptr), None),
        "dqrm_rowwise_quantize": ((ptr, i64, i64, i32, ptr, ptr, ptr), i64),
        "dqrm_tablewise_quantize": ((ptr, i64, ctypes.c_float, i32, ptr), None),
        "dqrm_absmax_bits": ((ptr, i64), ctypes.c_uint32),
        "dqrm_l2_params": ((ptr, i64, i64, i32, i64, ctypes.c_float, i32, ptr, ptr), i64),
        "dqrm_rowwise_quantize_params": ((ptr, i64, i64, i32, ptr, ptr, ptr, ptr, ptr), i64),
        "dqrm_fq_rowwise_params": ((ptr, i64, i64, i32, ptr, ptr), None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@lru_cache(maxsize=1)
def _kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (after one warning) where they are off or cannot build."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return load()
    except NativeUnavailable as exc:
        _log.warning(  # a log record, not a printed warning: the Python API prints nothing
            "dqrm-compress: compiled quantization kernels unavailable (%s); QAT and "
            "conversion use the PyTorch path, which gives the same values more slowly",
            exc,
        )
        return None


def enabled() -> bool:
    """Whether QAT lookups and conversion run the compiled kernels in this process."""
    return _kernels() is not None


def accepts(w: torch.Tensor) -> bool:
    """Whether the kernels can work on ``w`` in place: contiguous float32 on the CPU."""
    return w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()


def _written(w: torch.Tensor) -> torch.Tensor:
    # the kernels write through a raw pointer: tell autograd the tensor changed
    torch.autograd.graph.increment_version(w)
    return w


def fake_quantize_rowwise_(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`compress.quant.fake_quant.fake_quantize_rowwise_` (float32 ``[R, D]``, in place)."""
    lib = _kernels()
    if lib is None or not accepts(w) or w.dim() != 2 or w.shape[1] == 0:
        return fake_quant.fake_quantize_rowwise_(w, bits)
    lib.dqrm_fq_rowwise(w.data_ptr(), w.shape[0], w.shape[1], bits)
    return _written(w)


def fake_quantize_tablewise_(w: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """:func:`compress.quant.fake_quant.fake_quantize_tablewise_` (float32, in place)."""
    lib = _kernels()
    if lib is None or not accepts(w):
        return fake_quant.fake_quantize_tablewise_(w, scale, bits)
    lib.dqrm_fq_tablewise(w.data_ptr(), w.numel(), scale, bits)
    return _written(w)


def _require() -> ctypes.CDLL:
    lib = _kernels()
    if lib is None:
        raise NativeUnavailable("the compiled kernels are off or could not be built")
    return lib


def _table_args(w: torch.Tensor, block: int, summary: tuple[torch.Tensor, ...]) -> tuple:
    """``(w, rows, dim, block, bmax, barg, dirty)`` as the build and rescan kernels take them."""
    return (w.data_ptr(), w.shape[0], w.shape[1], block, *(t.data_ptr() for t in summary))


def blocks_build(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block summary ``(bmax, barg, dirty)`` of ``max |w[r, :]|`` over blocks of ``block`` rows
    (see :mod:`compress.methods.scale_tracking`). ``w``: contiguous float32 ``[R, D]``."""
    lib = _require()
    if not accepts(w):
        raise ValueError("blocks_build: needs a contiguous float32 CPU tensor")
    nblocks = -(-w.shape[0] // block)
    summary = (
        torch.empty(nblocks, dtype=torch.float32),  # bmax
        torch.empty(nblocks, dtype=torch.int32),  # barg
        torch.empty(nblocks, dtype=torch.uint8),  # dirty
    )
    lib.dqrm_blocks_build(*_table_args(w, block, summary))
    return summary


def blocks_update(
    w: torch.Tensor, block: int, ids: torch.Tensor, summary: tuple[torch.Tensor, ...]
) -> None:
    """Fold the rows ``ids`` (int64, they changed) into a block summary, in place."""
    lib = _require()
    ids = ids.to(torch.int64).contiguous()
    ptrs = (t.data_ptr() for t in summary)
    lib.dqrm_blocks_update(w.data_ptr(), w.shape[1], block, ids.data_ptr(), ids.numel(), *ptrs)


def blocks_rescan(w: torch.Tensor, block: int, summary: tuple[torch.Tensor, ...]) -> int:
    """Rescan the dirty blocks of a summary in place; how many there were."""
    return int(_require().dqrm_blocks_rescan(*_table_args(w, block, summary)))


def _packs(x: torch.Tensor, out: torch.Tensor, bits: int, *per_row: torch.Tensor) -> bool:
    """Whether the conversion kernels can read ``x`` (contiguous float32 ``[m, D]`` on the CPU)
    and write ``out`` (contiguous uint8 on the CPU). ``ValueError`` when they could but the sizes
    do not match: ``bits`` 2, 4 or 8 with ``D * bits`` whole bytes, ``out`` ``[m, D * bits / 8]``
    and each of ``per_row`` ``m`` values (the kernels write through raw pointers, trusting them)."""
    if not (
        accepts(x)
        and x.dim() == 2
        and out.dtype == torch.uint8
        and out.device.type == "cpu"
        and out.is_contiguous()
    ):
        return False
    rows, dim = x.shape
    if bits not in (2, 4, 8) or dim * bits % 8 or tuple(out.shape) != (rows, dim * bits // 8):
        raise ValueError(
            f"cannot pack {bits}-bit codes of a [{rows}, {dim}] chunk into {list(out.shape)} bytes"
        )
    if any(t.numel() != rows for t in per_row):
        raise ValueError(
            f"per-row outputs of {[t.numel() for t in per_row]} values for {rows} rows"
        )
    return True


#: Rows below which a chunk is quantized on one thread (splitting costs more than it saves).
PARALLEL_MIN_ROWS = 8192
#: The same for the L2 range search, which spends about 65 passes on each row.
L2_PARALLEL_MIN_ROWS = 512


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="dqrm-quantize")


# a forked child (a data loader worker) has none of the pool's threads: it makes its own
os.register_at_fork(after_in_child=_pool.cache_clear)


def _row_parts(rows: int, min_rows: int = PARALLEL_MIN_ROWS) -> list[tuple[int, int]]:
    """``rows`` split into ``torch.get_num_threads()`` parts (one when there are fewer than
    ``min_rows`` a part)."""
    n = max(1, min(torch.get_num_threads(), rows // min_rows))
    bounds = [rows * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _in_parts(
    rows: int, run: Callable[[int, int], int], min_rows: int = PARALLEL_MIN_ROWS
) -> list[int]:
    """``run(start, stop)`` over parts of ``rows`` (:func:`_row_parts`), the parts on the pool's
    threads (a compiled kernel releases the GIL) and the last one on this thread; their results
    in order."""
    parts = _row_parts(rows, min_rows)
    futures = [_pool().submit(run, a, b) for a, b in parts[:-1]]
    last = run(*parts[-1])
    return [f.result() for f in futures] + [last]


def rowwise_quantize_into(
    x: torch.Tensor, bits: int, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> int | None:
    """FBGEMM's row-wise quantization of ``x`` (float32 ``[m, D]``) into ``packed`` (uint8
    ``[m, D*bits/8]``) and the fp16 ``scale``/``bias`` ``[m]``, compiled, one pass over the rows
    (split over ``torch.get_num_threads()`` threads when there are many): the bytes of
    :func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`.

    Returns ``-1`` when every row was written, a row whose scale or bias is not a finite fp16
    number otherwise, and ``None`` (nothing written) where the kernels are off or cannot take
    these tensors.
    """
    lib = _kernels()
    outputs = (scale, bias)
    if (
        lib is None
        or any(t.dtype != torch.float16 or not t.is_contiguous() for t in outputs)
        or not _packs(x, packed, bits, *outputs)
    ):
        return None
    dim = x.shape[1]
    pointers = (x.data_ptr(), packed.data_ptr(), scale.data_ptr(), bias.data_ptr())
    strides = (dim * 4, packed.shape[1], 2, 2)  # bytes a row

    def run(start: int, stop: int) -> int:
        xp, pp, sp, bp = (p + start * s for p, s in zip(pointers, strides, strict=True))
        bad = int(lib.dqrm_rowwise_quantize(xp, stop - start, dim, bits, pp, sp, bp))
        return bad if bad < 0 else start + bad

    bad = [b for b in _in_parts(x.shape[0], run) if b >= 0]
    return min(bad) if bad else -1


def l2_params(
    x: torch.Tensor, bits: int, bins: int, ratio: float, refine: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row stored ``(scale, bias)`` (float32 ``[m]`` holding fp16 values) of ``x`` (float32
    ``[m, D]``) by the greedy L2 range search and ``refine`` least-squares steps
    (:mod:`compress.quant.l2_ranges`), compiled and split over threads as
    :func:`rowwise_quantize_into`; ``None`` where the kernels are off or cannot take ``x``.

    Raises:
        ValueError: a row holds a NaN or an inf (the message names it).
        MemoryError: the kernel's scratch could not be allocated.
    """
    lib = _kernels()
    if lib is None or not accepts(x) or x.dim() != 2 or x.shape[1] == 0:
        return None
    rows, dim = x.shape
    scale = torch.empty(rows, dtype=torch.float32)
    bias = torch.empty(rows, dtype=torch.float32)
    xp, sp, bp = x.data_ptr(), scale.data_ptr(), bias.data_ptr()

    def run(start: int, stop: int) -> int:
        n = stop - start
        off = start * 4
        bad = int(
            lib.dqrm_l2_params(
                xp + start * dim * 4, n, dim, bits, bins, ratio, refine, sp + off, bp + off
            )
        )
        return bad if bad < 0 else start + bad

    results = _in_parts(rows, run, L2_PARALLEL_MIN_ROWS)
    if -2 in results:
        raise MemoryError(f"L2 range search: no memory for {dim * 16} floats of scratch")
    bad = [b for b in results if b >= 0]
    if bad:
        raise ValueError(f"row {min(bad)} holds a NaN or an infinite value")
    return scale, bias


def rowwise_quantize_params_into(
    x: torch.Tensor,
    bits: int,
    scale32: torch.Tensor,
    bias32: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> int | None:
    """Row-wise codes of ``x`` (float32 ``[m, D]``) at the given per-row ``scale32``/``bias32``
    (float32 ``[m]`` holding fp16 values; :func:`rowwise_quantize_into` takes them from each row's
    min and max), ``clamp(rint((x - bias) * (1 / scale)), 0, 2^bits - 1)``, into ``packed``, and
    the parameters as fp16 into ``scale``/``bias``. Returns ``-1``, the first row whose scale or
    bias is not a finite fp16 number, or ``None`` (nothing written) where the kernels are off or
    cannot take these tensors."""
    lib = _kernels()
    if (
        lib is None
        or any(not accepts(t) for t in (scale32, bias32))
        or any(t.dtype != torch.float16 or not t.is_contiguous() for t in (scale, bias))
        or not _packs(x, packed, bits, scale32, bias32, scale, bias)
    ):
        return None
    dim = x.shape[1]
    pointers = (x.data_ptr(), scale32.data_ptr(), bias32.data_ptr(), packed.data_ptr())
    pointers += (scale.data_ptr(), bias.data_ptr())
    strides = (dim * 4, 4, 4, packed.shape[1], 2, 2)

    def run(start: int, stop: int) -> int:
        xp, s32, b32, pp, sp, bp = (p + start * s for p, s in zip(pointers, strides, strict=True))
        bad = int(
            lib.dqrm_rowwise_quantize_params(xp, stop - start, dim, bits, s32, b32, pp, sp, bp)
        )
        return bad if bad < 0 else start + bad

    bad = [b for b in _in_parts(x.shape[0], run) if b >= 0]
    return min(bad) if bad else -1


def fake_quantize_rowwise_params_(
    w: torch.Tensor, bits: int, scale32: torch.Tensor, bias32: torch.Tensor
) -> bool:
    """Fake-quantize float32 ``w`` ``[R, D]`` in place at per-row ``scale32``/``bias32`` (float32
    ``[R]`` holding fp16 values): the values :func:`rowwise_quantize_params_into` stores,
    dequantized. ``False`` (nothing written) where the kernels are off or cannot take these
    tensors."""
    lib = _kernels()
    if (
        lib is None
        or not accepts(w)
        or w.dim() != 2
        or any(not accepts(t) or t.numel() != w.shape[0] for t in (scale32, bias32))
    ):
        return False
    lib.dqrm_fq_rowwise_params(
        w.data_ptr(), w.shape[0], w.shape[1], bits, scale32.data_ptr(), bias32.data_ptr()
    )
    _written(w)
    return True


def tablewise_quantize_into(x: torch.Tensor, scale: float, bits: int, packed: torch.Tensor) -> bool:
    """DQRM's table-wise codes of ``x`` (float32 ``[m, D]``) at ``scale``, packed into ``packed``
    (uint8 ``[m, D*bits/8]``), compiled (split over threads as :func:`rowwise_quantize_into`): the
    bytes of :func:`compress.quant.tablewise.tablewise_quantize_packed`; ``False`` (nothing
    written) where the kernels are off or cannot take these tensors."""
    lib = _kernels()
    if lib is None or not _packs(x, packed, bits):
        return False
    dim, width = x.shape[1], packed.shape[1]
    xp, pp = x.data_ptr(), packed.data_ptr()

    def run(start: int, stop: int) -> int:
        lib.dqrm_tablewise_quantize(
            xp + start * dim * 4, (stop - start) * dim, scale, bits, pp + start * width
        )
        return -1

    _in_parts(x.shape[0], run)
    return True


def absmax(x: torch.Tensor) -> float | None:
    """``max|x|`` of a contiguous float32 CPU tensor in one compiled pass: ``inf`` when it holds
    an inf, ``nan`` when it holds a NaN; ``None`` where the kernels are off or cannot take ``x``."""
    lib = _kernels()
    if lib is None or not accepts(x):
        return None
    if x.numel() == 0:
        return 0.0
    bits = int(lib.dqrm_absmax_bits(x.data_ptr(), x.numel()))
    if bits > 0x7F800000:
        return math.nan
    return struct.unpack("<f", struct.pack("<I", bits))[0]
