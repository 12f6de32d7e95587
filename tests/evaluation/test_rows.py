"""Result rows: an expert row (each task with its own expert, one lm-eval run) equals
evaluating each expert on its own task separately."""

from __future__ import annotations

import pytest

from seap.data.catalogue import TaskCatalogue
from seap.evaluation.harness import evaluate
from seap.evaluation.rows import evaluate_masks
from seap.model.masking import apply_mask
from tests.helpers import make_tiny_model
from tests.helpers_tasks import make_task_dir
from tests.model.test_surgery import mask_for


def test_expert_row_equals_each_expert_on_its_own_task(tmp_path) -> None:
    catalogue = TaskCatalogue(make_task_dir(tmp_path / "data"), tmp_path / "work")
    specs = catalogue.resolve(["geo", "life"])
    loaded = make_tiny_model("llama-gqa")
    masks = {"geo": mask_for(loaded, 0.3), "life": mask_for(loaded, 0.5)}
    row, items = evaluate_masks(loaded, catalogue, specs, "seap-expert", 0.3, masks, limit=8, batch_size=4)
    for spec in specs:
        alone = evaluate(apply_mask(loaded, masks[spec.name], "hard"), catalogue, [spec], limit=8, batch_size=4)
        assert row["tasks"][spec.name]["acc"] == alone["tasks"][spec.name]["acc"]
        for a, b in zip(items[spec.name], alone["items"][spec.name], strict=True):
            assert a["doc_id"] == b["doc_id"]
            assert [r[0] for r in a["resps"]] == pytest.approx([r[0] for r in b["resps"]], abs=1e-5)
    assert row["realised_sparsity"] == pytest.approx((masks["geo"].realised_sparsity()
                                                      + masks["life"].realised_sparsity()) / 2)
