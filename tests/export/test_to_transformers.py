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
for folder, ids, out in zip(*[iter(sys.argv[1:])] * 3):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids, weights_only=True)).logits, out)
assert not any(name == "seap" or name.startswith("seap.") for name in sys.modules), "seap was imported"
"""
SAME_WIDTH_ARCHS = ("llama-gqa", "mistral", "qwen2")


def _same_width(loaded, sparsity, **kw) -> PruningMask:
    return mask_for(loaded, sparsity, schedule="uniform", **kw)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """Same-width pruned models exported as stock folders (each written, then replaced by a second
    export with ``overwrite``): three families, and a Llama with biases on o_proj/down_proj. Every
    folder is loaded by plain ``AutoModelForCausalLM`` in ONE process that never imports seap.
    Returns case -> (base, pruned model, folder, input ids, logits of the stock load)."""
    root = tmp_path_factory.mktemp("stock")
    cases = {}
    for arch in SAME_WIDTH_ARCHS:
        loaded = make_tiny_model(arch)
        pruned = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=False)
        cases[arch] = (loaded, pruned, loaded.tokenizer(["the capital of france is paris"], return_tensors="pt")["input_ids"])
    loaded = make_tiny_model("llama-gqa")
    pruned = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=True)  # biases on o/down
    cases["llama-gqa-bias"] = (loaded, pruned, torch.tensor([[5, 9, 14, 3, 22, 7]]))
    argv = []
    for name, (_, pruned, ids) in cases.items():
        export_transformers(pruned, root / name)
        export_transformers(pruned, root / name, overwrite=True)  # its own earlier export: replaced
        torch.save(ids, root / f"{name}.ids.pt")
        argv += [str(root / name), str(root / f"{name}.ids.pt"), str(root / f"{name}.logits.pt")]
    subprocess.run([sys.executable, "-c", STOCK_LOAD, *argv], check=True, cwd=root, capture_output=True, text=True)
    return {name: (loaded, pruned, root / name, ids, torch.load(root / f"{name}.logits.pt", weights_only=True))
            for name, (loaded, pruned, ids) in cases.items()}


@pytest.mark.parametrize("arch", SAME_WIDTH_ARCHS)
def test_same_width_mask_loads_in_stock_transformers(stock, arch) -> None:
    loaded, pruned, folder, ids, stock_logits = stock[arch]
    config = json.loads((folder / "config.json").read_text())
    assert "seap_pruning" not in config and "per_layer_config" not in config
    assert config["seap_export"]["base_fingerprint"] == loaded.fingerprint
    with pytest.raises(SeapError, match="already exists"):
        export_transformers(pruned, folder)
    assert config["num_attention_heads"] < loaded.config.num_attention_heads
    with torch.no_grad():
        want = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(stock_logits, want, atol=1e-5, rtol=0)


def test_refit_bias_switches_the_bias_flag_on(stock) -> None:
    _, pruned, folder, ids, stock_logits = stock["llama-gqa-bias"]
    config = json.loads((folder / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    with torch.no_grad():
        want = pruned.model(input_ids=ids).logits
    torch.testing.assert_close(stock_logits, want, atol=1e-5, rtol=0)


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


def test_every_fix_offered_for_a_qwen2_model_works(tmp_path) -> None:
    """Qwen2 with per-layer widths and refitted biases: GGUF is refused, and the stock refusal
    must not send the user back to GGUF; what both offer (one width, no refitted bias) exports."""
    from seap.export.to_gguf import export_gguf

    loaded = make_tiny_model("qwen2")
    pruned = apply_mask(loaded, mask_for(loaded, 0.4), "hard", bias_compensation=True)  # logistic: widths differ
    with pytest.raises(UnsupportedArchitectureError, match="GGUF export is not available") as gguf:
        export_gguf(pruned, tmp_path / "m.gguf")
    with pytest.raises(SeapError, match="different widths") as hf:
        export_transformers(pruned, tmp_path / "stock")
    for fix in (gguf.value.fix, hf.value.fix):
        assert "--same-width" in fix and "--no-refit-bias" in fix and "load_pruned" in fix
    assert "--format gguf" not in hf.value.fix
    followed = apply_mask(loaded, _same_width(loaded, 0.5), "hard", bias_compensation=False)
    export_transformers(followed, tmp_path / "stock")
    assert (tmp_path / "stock" / "config.json").is_file() and not (tmp_path / "m.gguf").exists()
