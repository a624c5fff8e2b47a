"""What the row-wise and table-wise methods share: tables of packed n-bit integer codes.

Both store ``data`` uint8 ``[R, D*bits/8]`` (codes packed low bits first, FBGEMM's order,
:mod:`compress.quant.packing`) at 8, 4 or 2 bits, and both convert to FBGEMM's integer rows of the
same width for TorchRec (:data:`FBGEMM_DATA_TYPES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torchrec.modules.embedding_configs import DataType

from compress.quant.packing import SUPPORTED_BITS, unpack_nbit

if TYPE_CHECKING:
    from compress.recipe.reader import Keys
    from exporters.artifacts.read import TableArrays

#: Bit widths a recipe may give (``bits``), in the order its messages list them.
RECIPE_BITS = SUPPORTED_BITS
#: Bit widths a manifest entry may record (``bits``), in the order its messages list them.
STORED_BITS = tuple(sorted(SUPPORTED_BITS))
#: FBGEMM data type of integer rows of ``bits``.
FBGEMM_DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}


def read_bits(keys: Keys) -> int:
    """The rule's required ``bits``."""
    return keys.choice("bits", RECIPE_BITS, required=True)


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
    packed = torch.from_numpy(np.array(table.arrays["data"][start:stop]))
    return unpack_nbit(packed, int(table.bits), table.embedding_dim)
