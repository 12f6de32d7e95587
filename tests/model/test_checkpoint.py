import json

import pytest
import torch

from seap.errors import ArtifactError, SeapError
from seap.maths.masks import PruningMask
from seap.model.loading import load_model
from seap.model.masking import apply_mask
from seap.model.checkpoint import load_pruned, save_pruned
from tests.model.test_surgery import logits, mask_for


@pytest.mark.parametrize("bias_compensation", [False, True])
def test_save_load_identical_logits(tiny, tmp_path, bias_compensation) -> None:
    mask = mask_for(tiny, 0.5)
    hard = apply_mask(tiny, mask, "hard", bias_compensation=bias_compensation)
    save_pruned(hard, tmp_path / "pruned", mask)
    again = load_pruned(tmp_path / "pruned", device="cpu")
    torch.testing.assert_close(logits(again, tokenizer=tiny.tokenizer), logits(hard), atol=0, rtol=0)
    assert again.fingerprint == hard.fingerprint
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    layers = config["seap_pruning"]["layers"]
    assert len(layers) == tiny.adapter.text_config(tiny.model.config).num_hidden_layers
    assert config["per_layer_config"]["3"] == layers[3]
    assert config["seap_pruning"]["base_fingerprint"] == tiny.fingerprint
    assert PruningMask.load(tmp_path / "pruned" / "seap_mask").digest() == mask.digest()
    # load_model recognises a pruned folder too, and generate() works on it
    via_load_model = load_model(str(tmp_path / "pruned"), device="cpu")
    out = via_load_model.model.generate(**tiny.tokenizer(["the city"], return_tensors="pt"), max_new_tokens=4,
                                        do_sample=False, pad_token_id=0)
    assert out.shape[1] >= 3


def test_soft_models_cannot_be_saved_as_pruned(tmp_path) -> None:
    from tests.helpers import make_tiny_model

    loaded = make_tiny_model("llama-gqa")
    soft = apply_mask(loaded, mask_for(loaded), "soft")
    with pytest.raises(SeapError, match="only hard-pruned"):
        save_pruned(soft, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    from tests.helpers import make_tiny_model

    loaded = make_tiny_model("llama-gqa")
    mask = mask_for(loaded)
    hard = apply_mask(loaded, mask, "hard")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(hard.tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(hard, tmp_path / "out", mask)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_pruned_folder(tmp_path) -> None:
    from tests.helpers import make_tiny_model

    loaded = make_tiny_model("qwen2")
    mask = mask_for(loaded)
    save_pruned(apply_mask(loaded, mask, "hard"), tmp_path / "p", mask)
    weights = tmp_path / "p" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_pruned(tmp_path / "p")
    with pytest.raises(ArtifactError, match="not found"):
        load_pruned(tmp_path / "nothing")
