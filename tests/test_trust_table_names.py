"""Review of the tables dequantized at session load (:mod:`exporters.onnx.stacked_rows`): two
tables whose names sanitize alike (``t-a``, ``t_a``) must never read one another's rows, and such a
model is refused before any work with one line naming both."""

from __future__ import annotations

import numpy as np
import pytest

from compress import pipeline
from compress.cli.main import main
from compress.errors import ModelConfigError
from compress.io.model_spec import DLRMSpec, TableSpec
from exporters.onnx import stacked_rows
from exporters.onnx.spec import TableLookup
from tests.test_lookup_at_load import _graph
from tests.test_onnx_lookup import make_table

DIM = 16


@pytest.mark.parametrize("at_load", [True, False])
def test_tables_whose_names_sanitize_alike_are_refused_not_merged_as_one(
    at_load: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix the at-load path kept ``t-a``'s float32 rows for ``t_a`` too (both are
    ``emb.t_a.dequantized``): ``t_a``'s ids silently read ``t-a``'s rows; the per-row path refused."""
    first = TableLookup("t-a", ("f",), DIM, make_table("rowwise", 4, DIM, 10, 1).kind)
    second = TableLookup("t_a", ("g",), DIM, make_table("rowwise", 4, DIM, 10, 2).kind)
    assert not np.array_equal(first.kind.packed, second.kind.packed)
    assert stacked_rows.dequantize_at_load(first, DIM)
    if not at_load:
        monkeypatch.setattr(stacked_rows, "DEQUANTIZED_TABLE_BYTES", 0)
    with pytest.raises(ValueError, match="'emb.t_a.packed' added twice with different data"):
        _graph([first, second], (False, False))


def _spec_with_tables(names: tuple[str, ...]) -> DLRMSpec:
    tables = tuple(
        TableSpec(name=n, num_embeddings=10, embedding_dim=DIM, feature_names=(f"f{i}",))
        for i, n in enumerate(names)
    )
    return DLRMSpec("DLRM", tables, 3, (8, DIM), (8, 1))


def test_plan_refuses_tables_whose_names_sanitize_alike_up_front() -> None:
    with pytest.raises(ModelConfigError, match="tables 't-a' and 't_a' both map to the name 't_a'"):
        pipeline.plan(_spec_with_tables(("t-a", "t_a")), "int4_ptq")
    assert pipeline.plan(_spec_with_tables(("t-a", "t_b")), "int4_ptq").tables  # distinct: fine


def test_the_command_line_refuses_them_in_one_line(tmp_path, capsys) -> None:
    """A TorchRec checkpoint whose tables are named ``t-a`` and ``t_a``: exit 2, one line naming
    both, nothing written."""
    import torch
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    configs = [
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=10, feature_names=[f"f{i}"])
        for i, n in enumerate(("t-a", "t_a"))
    ]
    model = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=configs),
        dense_in_features=3,
        dense_arch_layer_sizes=[8, DIM],
        over_arch_layer_sizes=[8, 1],
    )
    torch.save(model.state_dict(), tmp_path / "m.pt")
    code = main(["--no-progress", "plan", str(tmp_path / "m.pt"), "--recipe", "int4_ptq"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tables 't-a' and 't_a' both map to the name 't_a'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
