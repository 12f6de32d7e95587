"""Expert bundles: masks + base reference, rebuilt into the pruned model, fingerprint-checked."""

from __future__ import annotations

import json

import pytest
import torch

from seap.registry.bundle import load_bundle, read_bundle, write_bundle
from seap.errors import ModelMismatchError
from seap.maths.masks import build_mask
from seap.model.masking import apply_mask
from seap.registry.records import ExpertRecord
from tests.helpers import make_tiny_model


@pytest.fixture()
def saved(tmp_path):
    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    from seap.model.loading import load_model

    base = load_model(str(tmp_path / "base"), device="cpu")
    from tests.maths.test_masks import scores_for

    mask = build_mask(scores_for(base, task="geo")[1], 0.5, "uniform")
    mask.save(tmp_path / "mask")
    record = ExpertRecord(name="seap-base-geo", kind="expert", task="geo", method="seap-expert", sparsity=0.5,
                          realised_sparsity=mask.realised_sparsity(), score="seap-sf", schedule="uniform",
                          base_model=str(tmp_path / "base"), base_fingerprint=base.fingerprint,
                          masks={"geo": str(tmp_path / "mask")}, metrics={"acc_geo": 0.5, "retention_geo": 0.9})
    return tmp_path, base, mask, record


def test_bundle_holds_masks_and_a_reference_not_the_weights(saved) -> None:
    tmp, base, mask, record = saved
    path = write_bundle(record, tmp / "bundle")
    data = json.loads((path / "bundle.json").read_text())
    assert data["base"] == {"reference": str((tmp / "base").resolve()), "fingerprint": base.fingerprint,
                            "dtype": "auto"}
    assert data["tasks"] == ["geo"] and data["masks"] == {"geo": "masks/geo"}
    assert not list(path.rglob("model.safetensors"))
    weights = sum(f.stat().st_size for f in (tmp / "base").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < weights / 4


def test_loaded_bundle_equals_the_hard_pruned_model(saved) -> None:
    tmp, base, mask, record = saved
    loaded = load_bundle(write_bundle(record, tmp / "bundle"), device="cpu")
    reference = apply_mask(base, mask, "hard")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.expert.model(ids).logits, reference.model(ids).logits)
    out = loaded.generate(["hello world"], max_new_tokens=3)
    assert out[0]["expert"] == "geo" and isinstance(out[0]["text"], str)


def test_a_changed_base_model_is_refused(saved, monkeypatch) -> None:
    tmp, _, _, record = saved
    path = write_bundle(record, tmp / "bundle")
    other = make_tiny_model("llama-gqa", seed=7)
    other.model.save_pretrained(tmp / "other")
    other.tokenizer.save_pretrained(tmp / "other")
    monkeypatch.setenv("SEAP_BASE_MODEL", str(tmp / "other"))
    with pytest.raises(ModelMismatchError, match="SEAP_BASE_MODEL"):
        load_bundle(path, device="cpu")


def test_a_bundle_whose_masks_disagree_with_its_base_is_refused(saved) -> None:
    tmp, _, _, record = saved
    path = write_bundle(record, tmp / "bundle")
    data = json.loads((path / "bundle.json").read_text())
    data["base"]["fingerprint"] = "sha256:" + "1" * 64
    (path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(ModelMismatchError, match="mask 'geo' was built on base"):
        read_bundle(path)


def test_reconstructed_experts_round_trip_through_bundles_alone_and_routed(saved) -> None:
    """A refitted expert is a small bundle too; loaded alone or from a routed bank it gives the
    hard-pruned reconstructed model's logits."""
    from seap.data.corpus import build_corpus
    from seap.evaluation.routed import ExpertBank
    from seap.maths.reconstruction import RefitOptions
    from seap.maths.scores import compute_scores
    from seap.model.calibration import collect_statistics
    from seap.model.refitting import reconstruct_mask
    from tests.helpers import SENTENCES

    tmp, base, _, record = saved
    corpus = build_corpus([{"text": t} for t in SENTENCES * 4], "geo", None)
    stats = collect_statistics(base, corpus, progress=False)
    rebuilt = reconstruct_mask(base, build_mask(compute_scores(stats, "seap-sf"), 0.5, "uniform"), [corpus],
                               RefitOptions(alpha=0.05, bias=True), progress=False)
    rebuilt.save(tmp / "refitted")
    path = write_bundle(ExpertRecord(**{**record.__dict__, "masks": {"geo": str(tmp / "refitted")}}), tmp / "b2")
    assert read_bundle(path).masks and not list(path.rglob("model.safetensors"))
    loaded = load_bundle(path, device="cpu")
    reference = apply_mask(base, rebuilt, "hard")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.expert.model(ids).logits, reference.model(ids).logits)
        bank = ExpertBank(base, {"geo": rebuilt})
        torch.testing.assert_close(bank.get("geo").model(ids).logits, reference.model(ids).logits)
