"""Stock-loadable export: plain ``AutoModelForCausalLM.from_pretrained`` (in a process that never
imports seap) loads a same-width pruned model with identical logits; per-layer widths are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from seap.errors import SeapError, UnsupportedArchitectureError
from seap.export.to_transformers import export_transformers
from seap.maths.masks import PruningMask
from seap.model.masking import apply_mask
from tests.helpers import make_tiny_model, make_tiny_moe
from tests.model.test_surgery import logits, mask_for

STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
assert not any(name == "seap" or name.startswith("seap.") for name in sys.modules), "seap was imported"
"""


def _stock_logits(folder, ids, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    return torch.load(tmp_path / "out.pt", weights_only=True)


def _same_width(loaded, sparsity, **kw) -> PruningMask:
    return mask_for(loaded, sparsity, schedule="uniform", **kw)


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral", "qwen2"])
def test_same_width_mask_loads_in_stock_transformers(tmp_path, arch) -> None:
    loaded = make_tiny_model(arch)
    pruned = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=False)
    export_transformers(pruned, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert "seap_pruning" not in config and "per_layer_config" not in config
    assert config["seap_export"]["base_fingerprint"] == loaded.fingerprint
    with pytest.raises(SeapError, match="already exists"):
        export_transformers(pruned, tmp_path / "stock")
    export_transformers(pruned, tmp_path / "stock", overwrite=True)  # its own earlier export: replaced
    assert config["num_attention_heads"] < loaded.config.num_attention_heads
    ids = loaded.tokenizer(["the capital of france is paris"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(_stock_logits(tmp_path / "stock", ids, tmp_path), want, atol=1e-5, rtol=0)


def test_refit_bias_switches_the_bias_flag_on(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    pruned = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=True)  # biases on o/down
    export_transformers(pruned, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        want = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(_stock_logits(tmp_path / "stock", ids, tmp_path), want, atol=1e-5, rtol=0)


def test_per_layer_widths_are_refused_with_what_to_do(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    pruned = apply_mask(loaded, mask_for(loaded, 0.4), "hard", bias_compensation=False)  # the logistic schedule: widths differ
    with pytest.raises(SeapError, match="different widths") as err:
        export_transformers(pruned, tmp_path / "stock")
    assert "--format gguf" in err.value.fix and "--same-width" in err.value.fix
    assert not (tmp_path / "stock").exists()


def test_widths_stock_transformers_rejects_are_refused(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")  # hidden 64: 6 kept heads do not divide it, which LlamaConfig refuses
    pruned = apply_mask(loaded, _same_width(loaded, 0.4), "hard", bias_compensation=False)
    assert pruned.adapter.geometry(pruned.model).layers[0].num_heads == 6
    with pytest.raises(UnsupportedArchitectureError, match="refuses the pruned widths.*multiple"):
        export_transformers(pruned, tmp_path / "stock")
    assert not list(tmp_path.iterdir())


def test_family_without_a_bias_setting_is_refused(tmp_path) -> None:
    loaded = make_tiny_model("mistral")  # Mistral's stock code has no attention_bias / mlp_bias
    pruned = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=True)
    with pytest.raises(UnsupportedArchitectureError, match="no (attention|mlp)_bias setting"):
        export_transformers(pruned, tmp_path / "stock")
    assert not list(tmp_path.iterdir())


def test_soft_and_moe_are_refused(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa")
    with pytest.raises(SeapError, match="soft-masked"):
        export_transformers(apply_mask(loaded, _same_width(loaded, 0.4), "soft"), tmp_path / "a")
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        moe = make_tiny_moe("mixtral")
        moe.model.config.seap_pruning = {"mode": "hard", "unit": "experts"}
        export_transformers(moe, tmp_path / "b")
    assert not list(tmp_path.iterdir())
