import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from seap.model.adapters import get_adapter, supported_model_types
from seap.errors import SeapError, UnsupportedArchitectureError
from seap.model.loaded import model_fingerprint
from seap.model.loading import load_model, resolve_model_path
from tests.helpers import SENTENCES, gguf_family_model, make_tiny_model, write_gguf


def test_fingerprint_is_stable_and_content_based(tmp_path) -> None:
    a = make_tiny_model("llama-gqa", seed=3)
    b = make_tiny_model("llama-gqa", seed=3)
    c = make_tiny_model("llama-gqa", seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 71
    # bf16 copy of a bf16-representable model hashes like its float32 upcast
    with torch.no_grad():
        for p in a.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    fp32 = model_fingerprint(a.model)
    assert model_fingerprint(a.model.to(torch.bfloat16)) == fp32
    # a config change that alters the computation changes the fingerprint
    b.model.config.rms_norm_eps = 1e-3
    assert model_fingerprint(b.model) != a.fingerprint


def test_local_folder_roundtrip(tmp_path) -> None:
    tiny = make_tiny_model("mistral")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.adapter.name == "mistral" and loaded.source.startswith("local:")


def hub_cache(cache: Path, repo: str, files: Path) -> None:
    """``files`` as the snapshot of hub model ``repo`` in a Hugging Face cache folder (what a
    download leaves there): the hub path is then taken offline, as on this machine."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(files, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)


def test_a_hub_model_is_fetched_as_a_snapshot_and_read_layer_by_layer(tmp_path, monkeypatch) -> None:
    """A hub id's config, safetensors and tokenizer are fetched once into the Hugging Face cache;
    its checkpoint is then read one layer at a time like a local folder,
    with the loaded model's fingerprint. An unsupported architecture is refused before any
    weight is fetched."""
    from seap.model.layer_stream import CheckpointLayers, open_layers

    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # (HF_HUB_CACHE, read at import)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path / "hub", "org/tiny", tmp_path / "m")
    location, kind = resolve_model_path("org/tiny")
    assert kind == "hub" and (location / "config.json").is_file()
    source = open_layers("org/tiny", "cpu")
    assert isinstance(source, CheckpointLayers) and source.fingerprint == tiny.fingerprint
    assert load_model("org/tiny", device="cpu").fingerprint == tiny.fingerprint
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10)).save_pretrained(tmp_path / "g")
    (tmp_path / "g" / "model.safetensors").unlink()  # (only the config is in the cache: enough to refuse)
    hub_cache(tmp_path / "hub", "org/gpt", tmp_path / "g")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        resolve_model_path("org/gpt")


def test_unsupported_architecture_lists_supported(tmp_path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10)).save_pretrained(tmp_path / "g")
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(str(tmp_path / "g"), device="cpu")
    message = str(err.value)
    assert "'gpt2'" in message and all(t in message for t in supported_model_types())
    with pytest.raises(UnsupportedArchitectureError):
        get_adapter(GPT2Config())


def test_bad_model_arguments(tmp_path, monkeypatch) -> None:
    with pytest.raises(SeapError, match="not found"):
        resolve_model_path("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeapError, match="without config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(SeapError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SeapError, match="not a readable GGUF"):
        resolve_model_path(str(tmp_path / "junk.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SeapError, match="could not read the config of model 'org/name'"):
        resolve_model_path("org/name")  # (a hub id: fetched here, and refused with what to check)


def test_gguf_of_unsupported_architecture(tmp_path) -> None:
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'") as err:
        load_model(str(path), device="cpu")
    assert "llama" in str(err.value)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "phi3"])
def test_gguf_of_each_newer_family_loads_and_prunes(tmp_path, arch) -> None:
    """`--model file.gguf` for the newer families whose GGUF files transformers reads (Gemma 3
    is checked on real weights in test_real_checkpoints): the file converts to the same logits
    as the model it was written from, its tokenizer comes with it, and `seap prune` runs on it
    (statistics with second moments, a refitted expert, a saved pruned model)."""
    import json

    from seap.cli import main

    model = gguf_family_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(model, path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.model.config.model_type == arch and get_adapter(loaded.model).model_types[0] == arch
    text = "the capital of france is paris"
    ids = loaded.tokenizer([text], return_tensors="pt")["input_ids"]
    # " capital" is one token, so the merges came along (the first word: as the family spells a prefix space)
    assert loaded.tokenizer.decode(ids[0]) == text and ids.shape[1] <= 8
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-4)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"task": "facts", "text": s}) + "\n" for s in SENTENCES * 2))
    assert main(["--no-progress", "prune", "--model", str(path), "--calib", str(calib), "--sparsity", "0.3",
                 "--schedule", "uniform", "--out", str(tmp_path / "pruned")]) == 0
    pruned = load_model(str(tmp_path / "pruned"), device="cpu")
    assert pruned.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 3


def test_unreachable_hub_id_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SeapError, match="could not read the config of model 'no-org/no-model'") as err:
        load_model("no-org/no-model", device="cpu")
    assert "local folder" in str(err.value)
