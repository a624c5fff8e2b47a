"""Bit widths and packing of n-bit integer codes into bytes, shared by every quantized format.

Codes are packed **low bits first**, FBGEMM's order (``FloatToFusedNBitRowwiseQuantizedSBHalf``
and the inference TBE ``IntNBitTableBatchedEmbeddingBagsCodegen``): at INT4 byte ``j`` holds
element ``2j`` in bits 0-3 and ``2j+1`` in bits 4-7; at INT2 elements ``4j .. 4j+3`` in bits
0-1, 2-3, 4-5, 6-7; INT8 is one code per byte. Row-wise (:mod:`compress.quant.fbgemm_rowwise`)
and table-wise (:mod:`compress.quant.tablewise`) tables store their codes this way.

Also the size of the chunks the quantizers convert a table in, so that converting a big table
never holds more than one chunk of float32 scratch (:func:`chunk_rows`).

The bit widths and byte counts are defined in :mod:`compress.quant.sizes` (no torch) and
re-exported here. Nothing here imports the rest of the project but that module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from compress.quant.sizes import (
    SUPPORTED_BITS,
    can_pack,
    check_bits,
    check_packable,
    codes_per_byte,
    packed_row_bytes,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "Chunks",
    "SUPPORTED_BITS",
    "can_pack",
    "check_bits",
    "check_float_table",
    "check_packable",
    "chunk_rows",
    "codes_per_byte",
    "pack_float_codes_into",
    "pack_nbit",
    "packed_row_bytes",
    "quantize_in_chunks",
    "slice_chunks",
    "unpack_nbit",
]


CHUNK_ELEMENTS = 1 << 20
"""Float32 elements (4 MiB) of scratch a chunked quantizer works on at a time: 65,536 rows of a
dim-16 table."""


def chunk_rows(dim: int) -> int:
    """Rows per chunk of a ``dim``-wide table: :data:`CHUNK_ELEMENTS` float32 values, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, dim))


def check_float_table(w: torch.Tensor, bits: int) -> tuple[int, int]:
    """``(rows, dim)`` of a float table ``w`` ``[R, D]`` whose rows pack at ``bits``
    (``ValueError`` otherwise)."""
    check_bits(bits)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    check_packable(w.shape[1], bits)
    return w.shape[0], w.shape[1]


#: Rows of a table as ``(start, stop, rows)``: consecutive chunks that cover the table in order,
#: ``rows`` the values of rows ``start:stop`` (``[stop - start, D]``, valid until the next chunk).
Chunks = Iterable[tuple[int, int, torch.Tensor]]


def slice_chunks(w: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """:data:`Chunks` of ``w`` ``[R, D]`` as views, ``chunk`` rows each (the last may be shorter)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    for start in range(0, w.shape[0], chunk):
        stop = min(start + chunk, w.shape[0])
        yield start, stop, w[start:stop]


def quantize_in_chunks(
    w: torch.Tensor,
    bits: int,
    chunk: int | None,
    codes: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor],
    *,
    compiled: Callable[[torch.Tensor, torch.Tensor, slice], bool] | None = None,
    chunks: Chunks | None = None,
) -> torch.Tensor:
    """Packed codes ``[R, D*bits/8]`` of a float table ``w`` ``[R, D]``, one chunk of rows at a time.

    Each chunk is quantized by ``compiled(x, out, rows)`` when given and it returns ``True`` (it
    wrote the packed codes of ``x`` into ``out``, rows ``rows`` of the result), else by
    ``codes(x, work, rows)``: ``x`` is rows ``rows`` of ``w`` as float32 ``[m, D]`` (the chunk
    itself when it is contiguous float32, else a copy in ``work``), ``work`` float32 ``[m, D]``
    scratch it may overwrite; it returns float32 codes ``[m, D]`` (whole numbers in
    ``[0, 2^bits - 1]``, may be ``work``), which are packed here. Both see the chunks in order.
    Memory: the packed output plus one chunk of scratch.

    Args:
        w: ``[R, D]`` float tensor; ``D`` a positive multiple of ``8 // bits``.
        bits: 8, 4 or 2.
        chunk: rows per chunk; default :func:`chunk_rows` of ``D``.
        codes: the quantizer of one chunk (PyTorch).
        compiled: the same in one compiled pass, where it can (:mod:`compress.quant.native`).
        chunks: where the rows come from (default: :func:`slice_chunks` of ``w``), e.g. a reader
            that streams a memory-mapped table from its file; they must cover ``w``'s rows in
            order, with ``w``'s shape.
    """
    rows, dim = check_float_table(w, bits)
    chunk = chunk_rows(dim) if chunk is None else int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    nb = dim * bits // 8
    packed = torch.empty(rows, nb, dtype=torch.uint8)
    if rows == 0:
        return packed
    scratch: dict[str, torch.Tensor] = {}

    def buffer(name: str, m: int, width: int) -> torch.Tensor:
        held = scratch.get(name)
        if held is None or held.shape[0] < m:
            held = scratch[name] = torch.empty(m, width, dtype=torch.float32)
        return held[:m]

    done = 0
    for start, stop, x in slice_chunks(w.detach(), chunk) if chunks is None else chunks:
        m = stop - start
        if start != done or m <= 0 or tuple(x.shape) != (m, dim):
            raise ValueError(
                f"chunk of rows {start}:{stop} with shape {tuple(x.shape)} does not continue rows "
                f"0:{done} of a [{rows}, {dim}] table"
            )
        done = stop
        out, where = packed[start:stop], slice(start, stop)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = buffer("work", m, dim).copy_(x)
        if compiled is not None and compiled(x, out, where):
            continue
        q = codes(x, buffer("work", m, dim), where)
        pack_float_codes_into(q, bits, out, None if bits == 8 else buffer("acc", m, nb))
    if done != rows:
        raise ValueError(f"the chunks covered rows 0:{done} of a table of {rows} rows")
    return packed


def pack_nbit(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes, low bits first, into bytes (see the module docstring).

    Args:
        q: ``[R, D]`` integer codes in ``[0, 2^bits - 1]``; ``D`` a multiple of ``8 // bits``.
        bits: 8, 4 or 2.

    Returns:
        ``[R, D * bits / 8]`` uint8.
    """
    bits = check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    check_packable(q.shape[1], bits)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits")
    q8 = q.to(torch.uint8)
    out = torch.empty(q.shape[0], q.shape[1] * bits // 8, dtype=torch.uint8)
    if bits == 8:
        return out.copy_(q8)
    per = codes_per_byte(bits)
    g = q8.reshape(q.shape[0], -1, per)
    acc = g[..., 0].clone()
    for k in range(1, per):
        acc.bitwise_or_(torch.bitwise_left_shift(g[..., k], k * bits))
    return out.copy_(acc)


def pack_float_codes_into(
    codes: torch.Tensor, bits: int, out: torch.Tensor, acc: torch.Tensor | None
) -> None:
    """Pack float32 codes ``[m, D]`` (whole numbers in ``[0, 2^bits - 1]``) into uint8 ``out``
    ``[m, D*bits/8]`` (may be a strided view), the same bytes as :func:`pack_nbit`.

    The chunked quantizers' packer: it sums ``code_k * 2^(k*bits)`` in float32 (exact: every
    partial sum is an integer below 256) into the scratch ``acc`` (``[m, D*bits/8]`` float32,
    ``None`` at INT8) and converts once into ``out``.
    """
    per = codes_per_byte(bits)
    if per == 1:
        out.copy_(codes)
        return
    m, nb = out.shape
    g = codes.view(m, nb, per)
    torch.add(g[..., 0], g[..., 1], alpha=float(1 << bits), out=acc)
    for k in range(2, per):
        acc.add_(g[..., k], alpha=float(1 << (k * bits)))
    out.copy_(acc)


def unpack_nbit(packed: torch.Tensor, bits: int, dim: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_nbit`.

    Args:
        packed: ``[R, B]`` uint8.
        bits: 8, 4 or 2.
        dim: number of codes per row; defaults to ``B * 8 / bits`` and must equal it.

    Returns:
        ``[R, dim]`` uint8 codes.
    """
    bits = check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    per = codes_per_byte(bits)
    full = packed.shape[1] * per
    if dim is None:
        dim = full
    if dim != full:
        raise ValueError(f"{packed.shape[1]} bytes hold {full} codes at {bits} bits, not {dim}")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    parts = [torch.bitwise_right_shift(packed, k * bits).bitwise_and_(mask) for k in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], dim)
