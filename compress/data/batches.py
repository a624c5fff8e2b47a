"""The unit of data every consumer takes: a :class:`Batch` of dense features, sparse ids, labels.

``Batch.sparse`` is a TorchRec ``KeyedJaggedTensor`` whose keys are the model's feature names in the
model's order (``DLRMSpec.feature_names``), so a batch goes straight into a ``torchrec`` DLRM:
``model(batch.dense, batch.sparse)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module does not import torch
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    """``dense``: float32 ``[B, num_dense]``; ``sparse``: KJT over ``B`` samples; ``labels``: float32 ``[B]``."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])
