"""Every registered architecture adapter: covered by the tiny-model property tests (the
``tiny`` fixture walks :data:`tests.helpers.ARCHS` through statistics, soft = hard, save and
load, shards, refits), plus each family's special parts and the configurations it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from seap.errors import UnsupportedArchitectureError
from seap.model.adapters import ADAPTERS, supported_gguf_architectures, supported_model_types
from seap.model.loading import load_model
from seap.model.masking import apply_mask
from tests.helpers import ARCHS, MOE_ARCHS, make_tiny_model, make_tiny_moe
from tests.model.test_surgery import logits, mask_for


def test_every_registered_model_type_has_a_tiny_model_in_the_property_tests() -> None:
    """A family cannot be added without a tiny model that the shared property tests walk."""
    covered = {make_tiny_model(arch, layers=2).model.config.model_type for arch in ARCHS}
    covered |= {make_tiny_moe(arch, layers=2).model.config.model_type for arch in MOE_ARCHS}  # test_expert_pruning
    assert set(supported_model_types()) <= covered, set(supported_model_types()) - covered
    assert {"qwen3", "gemma2", "gemma3", "phi3"} <= set(supported_gguf_architectures())
    assert len({cls.name for cls in ADAPTERS}) == len(ADAPTERS)  # one adapter per family


def test_phi3_fused_projections_are_sliced_consistently() -> None:
    tiny = make_tiny_model("phi3")
    mods = tiny.adapter.layer_modules(tiny.adapter.decoder_layers(tiny.model)[0])
    fused = tiny.adapter.decoder_layers(tiny.model)[0].self_attn.qkv_proj.weight
    assert mods.k_proj.weight.data_ptr() == fused[64:].data_ptr()  # a view of the fused rows, not a copy
    mask = mask_for(tiny, 0.5, gqa_mode="kv-groups")
    hard = apply_mask(tiny, mask, "hard")
    for layer, layer_mask in zip(hard.adapter.decoder_layers(hard.model), mask.layers, strict=True):
        heads, kv, channels = (int(layer_mask.heads.sum()), int(layer_mask.kv_heads.sum()),
                               int(layer_mask.channels.sum()))
        assert layer.self_attn.qkv_proj.out_features == (heads + 2 * kv) * 8
        assert layer.mlp.gate_up_proj.out_features == 2 * channels
        assert layer.self_attn.config.num_attention_heads == heads  # the split reads this layer's own copy
    assert tiny.model.config.num_attention_heads == 8  # the base is untouched
    torch.testing.assert_close(logits(apply_mask(tiny, mask, "soft")), logits(hard), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_olmo_whole_projection_norms_are_pruned_with_their_heads(arch) -> None:
    tiny = make_tiny_model(arch)
    mask = mask_for(tiny, 0.4, gqa_mode="query-heads")
    hard = apply_mask(tiny, mask, "hard")
    base_attn = tiny.adapter.decoder_layers(tiny.model)
    pruned = [(layer, m) for layer, m in zip(hard.adapter.decoder_layers(hard.model), mask.layers, strict=True)
              if int(m.heads.sum()) < 8]
    assert pruned
    for layer, m in pruned:
        kept = int(m.heads.sum())
        assert layer.self_attn.q_norm.weight.numel() == kept * 8
        assert layer.self_attn.q_norm.variance_epsilon == pytest.approx(1e-5 * 8 / kept)
    assert all(layer.self_attn.q_norm.weight.numel() == 64 for layer in base_attn)  # the base is untouched
    torch.testing.assert_close(logits(apply_mask(tiny, mask, "soft")), logits(hard), atol=1e-4, rtol=0)


def test_gemma3_multimodal_prunes_only_its_text_decoder() -> None:
    tiny = make_tiny_model("gemma3")
    vision = {k: v.clone() for k, v in tiny.model.model.vision_tower.state_dict().items()}
    hard = apply_mask(tiny, mask_for(tiny, 0.5), "hard")
    assert hard.adapter.backbone(hard.model) is hard.model.model.language_model
    assert all(torch.equal(v, hard.model.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    assert hard.adapter.geometry(hard.model).total_params() < tiny.adapter.geometry(tiny.model).total_params()


def _config_only(tmp_path, config: dict) -> str:
    """A model folder whose weights file is not a weights file: a check that runs before any
    weight is read names the configuration problem; one that ran later would fail on the file."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    return str(tmp_path)


@pytest.mark.parametrize("arch, change, named", [
    ("qwen3", {"num_key_value_heads": 3}, "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    ("gemma2", {"layer_types": ["chunked_attention"] * 6}, "layer_types holds 'chunked_attention'"),
    ("smollm3", {"no_rope_layers": [1, 0]}, "no_rope_layers=[1, 0]"),
    ("olmo2", {"num_experts": 8}, "num_experts=8 (a mixture-of-experts layer)"),
])
def test_configurations_an_adapter_cannot_prune_are_refused_before_any_weight_is_read(tmp_path, arch, change,
                                                                                      named) -> None:
    config = make_tiny_model(arch).model.config.to_dict()
    config.update(change)
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_model(_config_only(tmp_path, config), device="cpu")
    assert named in str(error.value) and "cannot prune it correctly" in str(error.value)
