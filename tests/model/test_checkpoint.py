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


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "gemma3-text", "phi3"])
def test_written_layer_by_layer_equals_pruned_in_memory_and_resumes_after_a_kill(arch, tmp_path) -> None:
    """write_pruned (one layer read, pruned and written as a shard at a time) gives the folder
    that save_pruned of the model pruned in memory gives: the same fingerprint and logits after
    load_pruned, with a refitted mask and with bias compensation; interrupted after two layers,
    the same call resumes from its progress record and gives the same folder."""
    from seap.data.corpus import build_corpus
    from seap.model.checkpoint import write_pruned
    from seap.model.layer_stream import CheckpointLayers
    from seap.model.refitting import reconstruct_mask
    from tests.helpers import SENTENCES, make_tiny_model

    tiny = make_tiny_model(arch)
    tiny.model.save_pretrained(tmp_path / "base")
    tiny.tokenizer.save_pretrained(tmp_path / "base")
    base = load_model(str(tmp_path / "base"), device="cpu")
    source = CheckpointLayers(tmp_path / "base", "cpu")
    compensated = mask_for(base, 0.4)
    refitted = reconstruct_mask(source, mask_for(base, 0.4), [build_corpus([{"text": t} for t in SENTENCES * 4],
                                                                              "toy", None)], progress=False)
    for name, mask in (("compensated", compensated), ("refitted", refitted)):
        write_pruned(source, mask, tmp_path / name, progress=False)
        save_pruned(apply_mask(base, mask, "hard"), tmp_path / f"{name}-memory", mask)
        streamed, memory = load_pruned(tmp_path / name, device="cpu"), load_pruned(tmp_path / f"{name}-memory", device="cpu")
        assert streamed.fingerprint == memory.fingerprint
        torch.testing.assert_close(logits(streamed, tokenizer=tiny.tokenizer), logits(memory, tokenizer=tiny.tokenizer),
                                   atol=0, rtol=0)
        assert len(list((tmp_path / name).glob("model-*-of-*.safetensors"))) == len(mask.layers) + 1
    # killed after two layers (the source fails on the third), then the same call again
    read = source.layer
    calls = []

    def failing(index):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt("killed")
        return read(index)

    source.layer = failing
    with pytest.raises(KeyboardInterrupt):
        write_pruned(source, refitted, tmp_path / "resumed", work=tmp_path / "work", progress=False)
    assert json.loads((tmp_path / "work" / "progress.json").read_text())["layers"] == [0, 1]
    calls.clear()
    source.layer = lambda index: (calls.append(index), read(index))[1]
    write_pruned(source, refitted, tmp_path / "resumed", work=tmp_path / "work", progress=False)
    assert calls == list(range(2, len(refitted.layers)))  # the finished layers were not read again
    assert load_pruned(tmp_path / "resumed", device="cpu").fingerprint == \
        load_pruned(tmp_path / "refitted", device="cpu").fingerprint
    assert not (tmp_path / "work").exists()
