"""Calibrate static INT8 activation ranges (``[mlp] activations = "int8"``) on real inputs.

Before fine-tuning (and for PTQ, before converting) each MLP linear's input range is observed on
the first :data:`CALIBRATION_ROWS` rows of the training stream (the batches the loop's first
steps read, in the same seeded order; with only ``--valid``, its selection slice, never the
report slice), then fixed
(:func:`compress.methods.qat_linear.calibrate_activations`): fine-tuning trains the weights
under those ranges, and the converted model and its ONNX graph use them unchanged. Every
data-parallel worker reads the same rows, so the replicas start identical. Without data the
ranges cannot be calibrated and the job stops with one line (sampled inputs are not the inputs a
served model sees).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import nn

from compress.data.batches import Batch
from compress.data.dataset import Dataset
from compress.data.stream import StreamedData
from compress.errors import SettingError
from compress.methods.qat_linear import activation_quantizers, calibrate_activations
from compress.train.loop import training_batches

#: Rows the activation ranges are observed on (fewer when the data has fewer).
CALIBRATION_ROWS = 65_536
#: Rows per calibration forward pass.
CALIBRATION_BATCH = 8_192
#: The one line a job needs INT8 activations without any data.
NEEDS_DATA = (
    '[mlp] activations = "int8" calibrates each linear\'s input range on real inputs: give '
    "--data (or --valid)"
)


def calibration_batches(
    data: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    seed: int,
    rows: int = CALIBRATION_ROWS,
) -> Iterator[Batch]:
    """The first ``min(rows, len(data))`` rows of ``data``'s training stream for ``seed``
    (:func:`compress.train.loop.training_batches`), in batches of up to
    :data:`CALIBRATION_BATCH`; a streamed set's readers stop when the iterator ends."""
    n = min(rows, len(data))
    if n <= 0:
        raise SettingError(NEEDS_DATA)
    size = min(CALIBRATION_BATCH, n)
    stream = training_batches(data, feature_names, size, seed, 0)
    try:
        for _ in range(math.ceil(n / size)):
            yield next(stream)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def calibrate(
    model: nn.Module,
    data: Dataset | StreamedData | None,
    feature_names: tuple[str, ...],
    seed: int,
) -> int:
    """Calibrate ``model``'s INT8 activation quantizers on ``data`` (module docstring); the
    number of rows read (0 when the model has no quantizer: nothing is read).
    :class:`SettingError` when it has some and there is no data."""
    if not activation_quantizers(model):
        return 0
    if data is None or len(data) == 0:
        raise SettingError(NEEDS_DATA)
    calibrate_activations(model, calibration_batches(data, feature_names, seed))
    return min(CALIBRATION_ROWS, len(data))
