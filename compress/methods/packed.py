"""What the row-wise and table-wise methods share: tables of packed n-bit integer codes.

Both store ``data`` uint8 ``[R, D*bits/8]`` (codes packed low bits first, FBGEMM's order,
:mod:`compress.quant.packing`) at 8, 4 or 2 bits, and both convert to FBGEMM's integer rows of the
same width for TorchRec (:func:`fbgemm_data_type`). torch and TorchRec are imported by the
functions that build tensors, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compress.quant.sizes import SUPPORTED_BITS

if TYPE_CHECKING:
    import torch

    from compress.recipe.reader import Keys
    from exporters.artifacts.read import TableArrays

#: Bit widths a recipe may give (``bits``), in the order its messages list them.
RECIPE_BITS = SUPPORTED_BITS
#: Bit widths a manifest entry may record (``bits``), in the order its messages list them.
STORED_BITS = tuple(sorted(SUPPORTED_BITS))
#: Bit widths FBGEMM has integer rows of (:func:`fbgemm_data_type`).
FBGEMM_BITS = (8, 4, 2)


def fbgemm_data_type(bits: int) -> Any:
    """TorchRec's ``DataType`` of FBGEMM integer rows of ``bits`` (one of :data:`FBGEMM_BITS`)."""
    from torchrec.modules.embedding_configs import DataType

    return {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}[bits]


def read_bits(keys: Keys) -> int:
    """The rule's required ``bits``."""
    return keys.choice("bits", RECIPE_BITS, required=True)


#: How a rule chooses the ranges of its codes (recipe key ``ranges``): ``minmax`` (row-wise: each
#: row's min and max, FBGEMM's quantizer; table-wise: DQRM's ``max|W|``) or ``l2`` (the ranges that
#: minimize the L2 error, :mod:`compress.quant.l2_ranges`).
RANGES = ("minmax", "l2")


def read_ranges(keys: Keys, default: str) -> str:
    """The rule's ``ranges`` (one of :data:`RANGES`), ``default`` when it gives none."""
    value = keys.choice("ranges", RANGES)
    return default if value is None else value


def packed_width(dim: int, bits: int) -> int:
    """Bytes of one row of ``dim`` codes of ``bits`` bits."""
    return dim * bits // 8


def check_packed(bits: int, dim: int, packed: np.ndarray, what: str) -> None:
    """``ValueError`` unless ``packed`` is uint8 ``[R, D*bits/8]`` codes of a supported width."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}: bits must be 2, 4 or 8, got {bits}")
    if (dim * bits) % 8:
        raise ValueError(f"{what}: dim {dim} x {bits} bits is not a whole number of bytes")
    width = packed_width(dim, bits)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != width:
        raise ValueError(
            f"{what}: packed must be uint8 [R, {width}], got {packed.dtype} {list(packed.shape)}"
        )


def stored_codes(table: TableArrays, start: int, stop: int) -> torch.Tensor:
    """uint8 codes ``[stop - start, D]`` of rows ``start:stop`` of a stored packed table."""
    import torch

    from compress.quant.packing import unpack_nbit

    packed = torch.from_numpy(np.array(table.arrays["data"][start:stop]))
    return unpack_nbit(packed, int(table.bits), table.embedding_dim)
