import pytest

from seap.model.calibration import collect_statistics
from seap.data.corpus import build_corpus
from seap.errors import ArtifactError, ModelMismatchError, SeapError
from seap.maths.masks import PruningMask, build_mask
from seap.maths.scores import combine_scores, compute_scores
from tests.helpers import SENTENCES, make_tiny_model


def scores_for(loaded, texts=SENTENCES, task="toy", score="seap-sf"):
    stats = collect_statistics(loaded, build_corpus([{"text": t} for t in texts], task, None), progress=False)
    return stats, compute_scores(stats, score)


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
@pytest.mark.parametrize("schedule", ["logistic", "uniform", "flap-adaptive"])
def test_masks_keep_valid_gqa_layers(gqa_mode, schedule) -> None:
    loaded = make_tiny_model("llama-gqa")
    _, scores = scores_for(loaded)
    mask = build_mask(scores, 0.4, schedule, gqa_mode, protect_first=1, protect_last=1)
    for layer, geo in zip(mask.layers, mask.geometry.layers):
        per_group = layer.heads.reshape(geo.num_kv_heads, geo.group_size).sum(1)
        kept = per_group[layer.kv_heads]
        assert (kept == kept[0]).all() and (per_group[~layer.kv_heads] == 0).all()
        if gqa_mode == "query-heads":
            assert layer.kv_heads.all()
    assert mask.meta["realised_sparsity"] == pytest.approx(mask.realised_sparsity())


def test_mask_removes_lowest_scores() -> None:
    loaded = make_tiny_model("llama-mha")
    _, scores = scores_for(loaded)
    mask = build_mask(scores, 0.3, "uniform")
    for layer_mask, layer_scores in zip(mask.layers, scores.layers):
        removed = layer_scores.channels[~layer_mask.channels]
        kept = layer_scores.channels[layer_mask.channels]
        assert removed.max() <= kept.min()
        removed_h = layer_scores.heads[~layer_mask.heads]
        if removed_h.numel():
            assert removed_h.max() <= layer_scores.heads[layer_mask.heads].min()


def test_save_load_roundtrip_and_metadata(tmp_path) -> None:
    loaded = make_tiny_model("qwen2")
    stats, scores = scores_for(loaded)
    mask = build_mask(scores, 0.3, "logistic", protect_first=1, protect_last=1, bias_compensation_stats=stats)
    mask.save(tmp_path / "m")
    again = PruningMask.load(tmp_path / "m")
    assert again.digest() == mask.digest()
    assert again.has_bias_compensation
    meta = again.meta
    assert meta["base_fingerprint"] == loaded.fingerprint
    for key in ("score", "schedule", "schedule_params", "target_sparsity", "realised_sparsity", "layers", "task", "gqa_mode"):
        assert key in meta
    assert len(meta["layers"]) == 6 and {"ratio", "realised"} <= set(meta["layers"][0])
    size = sum(f.stat().st_size for f in (tmp_path / "m").iterdir())
    assert size < 50_000  # small artifact, not a copy of the weights


def test_corrupt_or_foreign_mask_is_rejected(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    _, scores = scores_for(loaded)
    mask = build_mask(scores, 0.3, "uniform")
    mask.save(tmp_path / "m")
    other = make_tiny_model("llama-gqa", seed=7)
    with pytest.raises(ModelMismatchError, match="was built for base model"):
        PruningMask.load(tmp_path / "m").check_model(other.fingerprint)
    blob = tmp_path / "m" / "mask.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        PruningMask.load(tmp_path / "m")
    (tmp_path / "m" / "mask.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        PruningMask.load(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not found"):
        PruningMask.load(tmp_path / "missing")


def test_general_mask_differs_from_experts() -> None:
    loaded = make_tiny_model("llama-gqa")
    _, a = scores_for(loaded, SENTENCES[:6], "a")
    _, b = scores_for(loaded, SENTENCES[6:], "b")
    general = build_mask(combine_scores([a, b], {"a": 3}), 0.4, "uniform")
    assert general.meta["kind"] == "general" and general.meta["tasks"] == {"a": 3.0, "b": 2.0}
    expert = build_mask(a, 0.4, "uniform")
    assert expert.meta["kind"] == "expert"
    assert general.meta["realised_sparsity"] == pytest.approx(expert.meta["realised_sparsity"])


def test_bad_mask_options() -> None:
    loaded = make_tiny_model("llama-gqa")
    _, scores = scores_for(loaded)
    with pytest.raises(SeapError, match="GQA mode"):
        build_mask(scores, 0.3, "uniform", gqa_mode="whatever")
    with pytest.raises(SeapError, match="outside"):
        build_mask(scores, 1.2, "uniform")
