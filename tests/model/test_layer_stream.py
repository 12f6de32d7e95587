"""The layer stream (:mod:`seap.model.layer_stream`) equals the model in memory.

Every dense family is saved to a folder and walked from there one decoder layer at a time
(:class:`CheckpointLayers`: the layer's tensors read when it is visited and dropped after): its
fingerprint, hidden states, statistics and refitted masks equal, bit for bit, those of the same
checkpoint loaded whole (:class:`ResidentLayers`), and the statistics equal an independent
reference (a full forward of the whole model with hooks). The multimodal Gemma 3 and
mixture-of-experts checkpoints, whose tensors transformers renames or fuses when it loads
them, are read through transformers' own conversion rules and agree the same way. A
checkpoint with a missing or truncated shard is refused by name; one whose tensors no rule
finds is loaded whole instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from seap.data.corpus import build_corpus
from seap.errors import ArtifactError, SeapError
from seap.maths.masks import build_mask
from seap.maths.reconstruction import RefitOptions
from seap.maths.scores import compute_scores
from seap.model.batching import length_batches, pad_batch, tokenize_corpus
from seap.model.calibration import collect_statistics
from seap.model.hooks import HookManager, count_hooks
from seap.model.layer_stream import (
    CheckpointLayers,
    HiddenStates,
    NotStreamable,
    ResidentLayers,
    calibration_batches,
    open_layers,
)
from seap.model.loading import load_model
from seap.model.refitting import reconstruct_mask, reconstruct_mask_sequential
from seap.maths.expert_selection import CHANNEL_FIELDS, ROUTER_FIELDS
from seap.model.expert_pruning import collect_router_statistics
from tests.helpers import ARCHS, MOE_ARCHS, SENTENCES, make_tiny_model, make_tiny_moe

STREAMED = ARCHS  # (the multimodal Gemma 3 too: its text decoder's tensors renamed as transformers does)
LAYERS = {"smollm3": 4}  # 3 layers hold both attention kinds (sliding, full); SmolLM3's 4th has no rotary
TEXTS = SENTENCES[:7]  # batches of 3: padding in most of them
BATCH = 3


def save(loaded, folder: Path, **kwargs) -> Path:
    loaded.model.save_pretrained(folder, **kwargs)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The folder of each family's tiny model (saved once per module)."""
    folders: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in folders:
            model = make_tiny_moe(arch) if arch in MOE_ARCHS else make_tiny_model(arch, layers=LAYERS.get(arch, 3))
            folders[arch] = save(model, tmp_path_factory.mktemp(arch))
        return folders[arch]

    return get


def corpus():
    return build_corpus([{"text": t} for t in TEXTS], "toy", None)


def materialised(source) -> list[int]:
    """The decoder layers of ``source`` whose weights are in memory (not on the meta device)."""
    return [i for i, layer in enumerate(source.layers) if any(p.device.type != "meta" for p in layer.parameters())]


def watched(source: CheckpointLayers) -> list[tuple[int, list[int]]]:
    """Record, at every visit of a layer, which layers hold weights."""
    visits: list[tuple[int, list[int]]] = []
    real = source.layer

    def layer(index: int):
        out = real(index)
        visits.append((index, materialised(source)))
        return out

    source.layer = layer  # (an instance attribute: the walk calls it)
    return visits


def reference_moments(loaded, texts) -> list[dict[str, torch.Tensor]]:
    """Every layer's o_proj / down_proj inputs, from a full forward of the whole model per text
    (no padding, no layer stream), caught by forward-pre-hooks, in float64
    (:func:`tests.model.test_calibration.direct_inputs`)."""
    from tests.model.test_calibration import direct_inputs

    captured = direct_inputs(loaded, texts)
    layers = len(loaded.adapter.all_layer_modules(loaded.model))
    return [{module: torch.from_numpy(captured[(i, module)]) for module in ("attn", "mlp")} for i in range(layers)]


def assert_statistics_equal(a, b) -> None:
    """Bit for bit: every tensor of every layer, and the token counts."""
    assert a.num_tokens == b.num_tokens and a.fingerprint == b.fingerprint and a.geometry == b.geometry
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        for module in ("attn", "mlp"):
            mx, my = getattr(x, module), getattr(y, module)
            assert mx.count == my.count
            for name in ("mean", "m2", "mean_sq"):
                assert torch.equal(getattr(mx, name), getattr(my, name)), (i, module, name)
        for proj in ("o_proj", "down_proj"):
            nx, ny = getattr(x, proj), getattr(y, proj)
            assert torch.equal(nx.sq_l2, ny.sq_l2) and torch.equal(nx.l1, ny.l1) and nx.out_features == ny.out_features


def assert_statistics_match_reference(stats, loaded, texts) -> None:
    reference = reference_moments(loaded, texts)
    for i, layer in enumerate(stats.layers):
        for module in ("attn", "mlp"):
            x, m = reference[i][module], getattr(layer, module)
            assert m.count == x.shape[0]
            torch.testing.assert_close(m.mean, x.mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.mean_sq, (x * x).mean(0), rtol=1e-4, atol=1e-6)


def assert_refits_equal(a, b) -> None:
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert set(x.refit) == set(y.refit) and x.refit
        for key in x.refit:
            assert torch.equal(x.refit[key], y.refit[key]), (i, key)
    assert a.meta["reconstruction"] == b.meta["reconstruction"]


@pytest.mark.parametrize("arch", STREAMED)
def test_the_checkpoint_read_lazily_has_the_fingerprint_of_the_loaded_model(saved, arch) -> None:
    folder = saved(arch)
    source = CheckpointLayers(folder, "cpu")
    assert materialised(source) == [] and all(p.device.type == "meta" for p in source.model.parameters())
    assert source.fingerprint == load_model(str(folder), device="cpu").fingerprint
    assert materialised(source) == []  # (hashed one tensor at a time, nothing kept)
    assert source.location == str(folder) and source.num_layers == LAYERS.get(arch, 3)
    assert isinstance(open_layers(str(folder), "cpu"), CheckpointLayers)


@pytest.mark.parametrize("arch", STREAMED)
def test_statistics_streamed_from_the_folder_equal_the_loaded_model_and_a_full_forward(saved, arch) -> None:
    folder = saved(arch)
    loaded = load_model(str(folder), device="cpu")
    source = CheckpointLayers(folder, "cpu")
    visits = watched(source)
    lazy = collect_statistics(source, corpus(), batch_size=BATCH, progress=False)
    # one layer in memory at a time, in order, and none once the walk is done
    assert visits == [(i, [i]) for i in range(source.num_layers)] and materialised(source) == []
    assert not any(p.device.type != "meta" for p in source.model.parameters())
    resident = collect_statistics(ResidentLayers(loaded), corpus(), batch_size=BATCH, progress=False)
    assert_statistics_equal(lazy, resident)
    assert_statistics_equal(collect_statistics(str(folder), corpus(), batch_size=BATCH, progress=False), resident)
    assert lazy.fingerprint == loaded.fingerprint and count_hooks(loaded.model) == 0
    assert_statistics_match_reference(lazy, loaded, TEXTS)


def walk(source, token_ids: list[list[int]], batch_size: int) -> list:
    """Every batch run through every layer of ``source`` on its captured call arguments, one
    layer in memory at a time (the walk of :func:`seap.model.layer_stream.walk_layers`, by hand)."""
    batches = calibration_batches(source, [token_ids], batch_size)
    for i in range(source.num_layers):
        layer = source.layer(i)
        try:
            with torch.inference_mode():
                for batch in batches:
                    batch.hidden = batch.calls[i].run(layer, batch.hidden.to(source.device)).to("cpu")
        finally:
            source.release(i)
    return batches


def assert_walk_ends_on_the_models_own_hidden_states(loaded, source, token_ids, batch_size, exact: bool = True
                                                     ) -> None:
    """Each batch's hidden states after the last layer are, bit for bit (or within float32
    rounding when not ``exact``), those the whole model hands its final norm, on every real
    token (padding included in the batch)."""
    batches = walk(source, token_ids, batch_size)
    norm = loaded.adapter.backbone(loaded.model).norm
    for batch, indices in zip(batches, length_batches([len(x) for x in token_ids], batch_size), strict=True):
        input_ids, attention_mask = pad_batch([token_ids[j] for j in indices], 0, "cpu")
        seen = []
        with HookManager() as hooks, torch.no_grad():
            hooks.add_input_hook(norm, lambda _m, x, seen=seen: seen.append(x))
            loaded.model(input_ids=input_ids, attention_mask=attention_mask)
        real = attention_mask.bool()
        assert batch.count == int(attention_mask.sum()) and len(seen) == 1
        if exact:
            assert torch.equal(batch.hidden[real], seen[0][real]), float((batch.hidden[real] - seen[0][real]).abs().max())
        else:
            torch.testing.assert_close(batch.hidden[real], seen[0][real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", STREAMED)
def test_the_layers_read_one_by_one_end_on_the_hidden_states_of_the_models_own_forward(saved, arch) -> None:
    folder = saved(arch)
    source = CheckpointLayers(folder, "cpu")
    token_ids = tokenize_corpus(source.tokenizer, TEXTS, None)
    assert_walk_ends_on_the_models_own_hidden_states(load_model(str(folder), device="cpu"), source, token_ids, BATCH)
    assert materialised(source) == []


@pytest.mark.parametrize("arch", STREAMED)
def test_a_mask_refitted_from_the_folder_equals_one_refitted_on_the_loaded_model(saved, arch) -> None:
    folder = saved(arch)
    loaded = load_model(str(folder), device="cpu")
    stats = collect_statistics(loaded, corpus(), batch_size=BATCH, progress=False)
    mask = build_mask(compute_scores(stats, "seap-sf"), 0.4, "uniform")
    options = RefitOptions(alpha=1e-2, bias=True)
    source = CheckpointLayers(folder, "cpu")
    visits = watched(source)
    lazy = reconstruct_mask(source, mask, [corpus()], options, batch_size=BATCH, progress=False)
    assert [v[1] for v in visits] == [[i] for i in range(source.num_layers)] and materialised(source) == []
    resident = reconstruct_mask(loaded, mask, [corpus()], options, batch_size=BATCH, progress=False)
    assert_refits_equal(lazy, resident)
    assert_refits_equal(reconstruct_mask(str(folder), mask, [corpus()], options, batch_size=BATCH, progress=False),
                        resident)
    sequential = RefitOptions(alpha=1e-2, bias=True, sequential=True)
    assert_refits_equal(reconstruct_mask_sequential(str(folder), mask, corpus(), sequential, BATCH, progress=False),
                        reconstruct_mask_sequential(loaded, mask, corpus(), sequential, BATCH, progress=False))


def test_a_walk_with_its_hidden_states_on_disk_killed_part_way_resumes_to_the_same_results(saved, tmp_path) -> None:
    """With a work folder the hidden states wait on disk between layers and each finished layer is
    recorded: the statistics and the refit equal those held in memory, bit for bit, and a walk
    killed part-way, started again, visits only the layers it had not finished."""
    from seap.model.calibration import collect_task_statistics

    folder = saved("qwen3")
    loaded = load_model(str(folder), device="cpu")
    in_memory = collect_statistics(loaded, corpus(), batch_size=BATCH, progress=False)
    killed = CheckpointLayers(folder, "cpu")
    real = killed.layer

    def dies_at_layer_2(index: int):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return real(index)

    killed.layer = dies_at_layer_2
    with pytest.raises(KeyboardInterrupt):
        collect_task_statistics(killed, {"toy": corpus()}, BATCH, progress=False, work=tmp_path / "stats")
    again = CheckpointLayers(folder, "cpu")
    visits = watched(again)
    resumed = collect_task_statistics(again, {"toy": corpus()}, BATCH, progress=False, work=tmp_path / "stats")["toy"]
    assert [v[0] for v in visits] == [2]  # layers 0 and 1 were finished before the kill
    assert_statistics_equal(resumed, in_memory)
    mask = build_mask(compute_scores(in_memory, "seap-sf"), 0.4, "uniform")
    on_disk = reconstruct_mask(str(folder), mask, [corpus()], batch_size=BATCH, progress=False, work=tmp_path / "refit")
    assert_refits_equal(on_disk, reconstruct_mask(loaded, mask, [corpus()], batch_size=BATCH, progress=False))


def test_with_a_work_folder_each_batchs_first_layer_input_goes_to_disk_as_it_is_captured(saved, tmp_path) -> None:
    """The calibration's hidden states are never all in memory: captured for a walk with a work
    folder, each batch's first-layer input is written there at once, and read back the same."""
    source = CheckpointLayers(saved("llama-gqa"), "cpu")
    token_ids = [tokenize_corpus(source.tokenizer, TEXTS, None)]
    held = calibration_batches(source, token_ids, BATCH)
    spilled = calibration_batches(source, token_ids, BATCH, tmp_path / "walk")
    assert all(b.hidden is None for b in spilled) and all(b.hidden is not None for b in held)
    store = HiddenStates(spilled, tmp_path / "walk" / "hidden")
    assert len(list(store.folder.iterdir())) == len(held)
    for index, batch in enumerate(held):
        assert torch.equal(store.get(0, index), batch.hidden)


def test_a_sharded_checkpoint_streams_and_a_missing_or_truncated_shard_is_refused_by_name(tmp_path) -> None:
    loaded = make_tiny_model("llama-gqa", layers=2)
    folder = save(loaded, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    # the shards are read as one checkpoint
    source = CheckpointLayers(folder, "cpu")
    assert source.fingerprint == loaded.fingerprint == load_model(str(folder), device="cpu").fingerprint
    assert_statistics_equal(collect_statistics(source, corpus(), batch_size=BATCH, progress=False),
                            collect_statistics(loaded, corpus(), batch_size=BATCH, progress=False))

    def broken(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    victim = shards[1]
    missing = broken("missing", lambda d: (d / victim).unlink())
    truncated = broken("truncated", lambda d: (d / victim).write_bytes((d / victim).read_bytes()[:-100]))
    header = broken("header", lambda d: (d / victim).write_bytes((d / victim).read_bytes()[:6]))
    for copy, problem in ((missing, "is missing"), (truncated, "is unreadable or truncated"),
                          (header, "is unreadable or truncated")):
        with pytest.raises(ArtifactError, match=f"shard {victim} of .*{copy.name} {problem}") as error:
            CheckpointLayers(copy, "cpu")
        assert "re-download or re-save" in error.value.fix
        with pytest.raises(ArtifactError, match=victim):  # never a silent fall back to loading the model whole
            open_layers(str(copy), "cpu")
    # an index naming a tensor no shard holds
    lying = broken("lying", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {**index, "weight_map": {**index["weight_map"], "model.layers.0.extra.weight": victim}})))
    with pytest.raises(ArtifactError, match=rf"the index lists 1 tensor\(s\).*model.layers.0.extra.weight in {victim}"):
        CheckpointLayers(lying, "cpu")
    # one file, cut short
    single = save(loaded, tmp_path / "single")
    blob = single / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-64])
    with pytest.raises(ArtifactError, match="shard model.safetensors of .* truncated"):
        CheckpointLayers(single, "cpu")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_a_mixture_of_experts_checkpoint_streams_with_its_experts_fused_as_transformers_loads_them(saved, arch
                                                                                                ) -> None:
    """An MoE checkpoint stores one tensor per expert (or other names than the module's);
    transformers fuses or renames them when it loads the model. Read layer by layer through
    transformers' own conversion rules, it has the loaded model's fingerprint, its walk ends on
    the model's own hidden states, and its router statistics (with channel sums) equal the
    loaded model's, with no parameter left on the CPU. (Equal within float rounding: the CPU's
    grouped expert matmuls round differently when the same weights lie at another memory
    alignment, as a plain copy of the loaded model's parameters shows for GraniteMoE.)"""
    folder = saved(arch)
    source = open_layers(str(folder), "cpu")
    loaded = load_model(str(folder), device="cpu")
    assert isinstance(source, CheckpointLayers) and source.fingerprint == loaded.fingerprint
    token_ids = tokenize_corpus(source.tokenizer, TEXTS, None)
    assert_walk_ends_on_the_models_own_hidden_states(loaded, source, token_ids, BATCH, exact=False)
    streamed = collect_router_statistics(source, corpus(), batch_size=BATCH, channels=True, progress=False)
    whole = collect_router_statistics(loaded, corpus(), batch_size=BATCH, channels=True, progress=False)
    assert set(streamed.layers) == set(whole.layers) == set(loaded.adapter.moe_layers(loaded.model))
    for i, layer in whole.layers.items():
        for field in (*ROUTER_FIELDS, *CHANNEL_FIELDS):
            torch.testing.assert_close(getattr(streamed.layers[i], field), getattr(layer, field), rtol=1e-5,
                                       atol=1e-6, msg=f"layer {i} {field}")
        assert streamed.layers[i].tokens == layer.tokens == sum(map(len, token_ids))
    assert materialised(source) == []


def test_a_checkpoint_whose_tensors_are_not_the_modules_is_loaded_whole(saved, tmp_path) -> None:
    """A parameter that neither its module's name nor transformers' conversions find in the
    checkpoint: the folder is not read layer by layer but loaded whole (as transformers loads it)."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(saved("llama-gqa"), tmp_path / "renamed"))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.gate.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotStreamable, match="not in the checkpoint under their module names"):
        CheckpointLayers(folder, "cpu")
    assert isinstance(open_layers(str(folder), "cpu"), ResidentLayers)


def test_work_is_spread_over_devices_in_balanced_deterministic_groups() -> None:
    from seap.model.devices import on_devices, spread

    assert spread({"a": 5, "b": 1, "c": 4, "d": 2}, 2) == [["a", "b"], ["c", "d"]]
    assert spread({"a": 1, "b": 1}, 4) == [["a"], ["b"]]  # (no empty group)
    assert spread({"a": 1, "b": 2, "c": 3}, 1) == [["a", "b", "c"]]
    cpu = torch.device("cpu")
    assert on_devices([[1, 2], [3]], [cpu, cpu], lambda g, d, k: (sum(g), str(d), k)) == [(3, "cpu", 0), (3, "cpu", 1)]

    def failing(group, device, k):
        if k == 1:
            raise ValueError("second group failed")
        return k

    with pytest.raises(ValueError, match="second group"):
        on_devices([[1], [2]], [cpu, cpu], failing)


def test_device_lists_are_checked_before_any_model_is_loaded() -> None:
    from seap.model.loaded import resolve_device, resolve_devices

    assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2 and resolve_device("cpu,cpu") == torch.device("cpu")
    assert resolve_devices("auto") == ([torch.device("cuda", i) for i in range(torch.cuda.device_count())]
                                       or [torch.device("cpu")])
    for bad, message in (("cpu,", "empty or 'auto' entry"), ("cpu,auto", "empty or 'auto' entry"),
                         ("cpu,gpu7", "unknown device 'gpu7'")):
        with pytest.raises(SeapError, match=message):
            resolve_devices(bad)
