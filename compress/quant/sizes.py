"""Sizes and code ranges of the stored integer formats: plain integer arithmetic, no torch.

What the plan, the manifest reader and the graph tables need to know about the packed formats
without quantizing anything: the bit widths (:data:`SUPPORTED_BITS`), the bytes of packed codes
(low bits first, FBGEMM's order: :mod:`compress.quant.packing`), of FBGEMM's fused row-wise rows
(:mod:`compress.quant.fbgemm_rowwise`) and of DQRM's table-wise tables
(:mod:`compress.quant.tablewise`), and the range of symmetric codes. Those modules re-export what
they used to define here, so ``from compress.quant.packing import can_pack`` keeps working.

Nothing here imports the rest of the project.
"""

from __future__ import annotations

SUPPORTED_BITS = (8, 4, 2)
"""Bit widths of the row-wise, table-wise and per-channel quantizers."""

_GRANULARITIES = ("row", "table", "channel")

SCALE_BIAS_BYTES = 4
"""Bytes of the per-row ``fp16 scale`` + ``fp16 bias`` pair in FBGEMM's N-bit rows."""

ROW_ALIGNMENT = 16
"""Row alignment (bytes) of FBGEMM's inference TBE, TorchRec's ``DEFAULT_ROW_ALIGNMENT``."""


def check_bits(bits: int) -> int:
    """``bits`` as an int; ``ValueError`` unless it is one of :data:`SUPPORTED_BITS`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def codes_per_byte(bits: int) -> int:
    """``8 // bits``: how many codes one byte holds."""
    return 8 // bits


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes of ``dim`` packed ``bits``-bit codes: ``ceil(dim * bits / 8)``."""
    check_bits(bits)
    return (dim * bits + 7) // 8


def check_packable(dim: int, bits: int) -> None:
    """``ValueError`` unless rows of ``dim`` codes fill whole bytes at ``bits``."""
    if dim <= 0 or dim % codes_per_byte(bits) != 0:
        raise ValueError(
            f"dim {dim} cannot be packed at {bits} bits: it must be a positive multiple of "
            f"{codes_per_byte(bits)} (whole bytes per row)"
        )


def can_pack(dim: int, bits: int, granularity: str) -> bool:
    """Whether a ``dim``-wide table/weight can be stored at ``bits`` with ``granularity``.

    * ``"row"`` (FBGEMM rows): FBGEMM's quantize op requires ``dim*bits/8`` to be a whole, even
      number of bytes (``ncols % (2 * 8/bits) == 0``): ``dim`` a multiple of 2 at INT8, 4 at INT4,
      8 at INT2. (The inference TBE alone needs only whole bytes, ``dim % (8/bits) == 0``.)
    * ``"table"``: codes are one packed stream, any ``dim >= 1``. Converting a table-wise table to
      FBGEMM rows later additionally needs ``can_pack(dim, bits, "row")``.
    * ``"channel"``: int8 codes per element, any ``dim >= 1``.
    """
    bits = check_bits(bits)
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if dim <= 0:
        return False
    if granularity == "row":
        return dim % (2 * codes_per_byte(bits)) == 0
    return True


def rowwise_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a table in FBGEMM fused rows: ``rows * (ceil(dim*bits/8) + 4)``.

    (The inference TBE pads each row further to 16 bytes: see :func:`inference_row_bytes`.)
    """
    return rows * (packed_row_bytes(dim, bits) + SCALE_BIAS_BYTES)


def inference_row_bytes(dim: int, bits: int, row_alignment: int = ROW_ALIGNMENT) -> int:
    """Bytes per row of FBGEMM's inference TBE: ``round_up(4 + dim*bits/8, row_alignment)``."""
    unpadded = SCALE_BIAS_BYTES + packed_row_bytes(dim, bits)
    return -(-unpadded // row_alignment) * row_alignment


def signed_offset(bits: int) -> int:
    """``2^(bits-1)`` (8 at INT4, 128 at INT8): ``bits``-bit symmetric codes ``q`` lie in
    ``[-2^(bits-1), 2^(bits-1) - 1]`` and are stored unsigned as ``q + 2^(bits-1)`` (the zero point
    of the packed table-wise codes)."""
    return 1 << (bits - 1)


def symmetric_range(bits: int) -> tuple[int, int]:
    """The smallest and largest ``bits``-bit symmetric code: ``(-2^(bits-1), 2^(bits-1) - 1)``."""
    return -signed_offset(bits), signed_offset(bits) - 1


def tablewise_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a table-wise table: ``ceil(rows*dim*bits/8)`` packed codes + one 4-byte scale.

    The scale is counted as fp32 (4 bytes); its value is fp16-exact.
    """
    check_bits(bits)
    return (rows * dim * bits + 7) // 8 + 4
