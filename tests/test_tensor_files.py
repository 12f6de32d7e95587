"""Safetensors files read and written one tensor at a time (seap.tensor_files)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from seap.tensor_files import LazyTensors, TensorFile, TensorFileError, stored, subset, write_tensor_file

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = tuple(int(s) for s in torch.randint(0, 5, (i % 4,), generator=g))
        out[f"layers.{i % 3}.t{i}"] = (torch.randn(shape, generator=g) * 50).to(dtype)
    out["empty"] = torch.zeros(0, 3)
    out["scalar"] = torch.tensor(2.5)
    return out


@pytest.mark.parametrize("metadata", [None, {"meta": '{"a": 1}'}])
def test_written_bytes_equal_safetensors_own_and_read_back_lazily(tmp_path, metadata) -> None:
    """The writer's bytes are safetensors' own (so artifact checksums do not change), and a
    lazy mapping reads every tensor back exactly, from a file or copied unread into another."""
    for seed in range(5):
        tensors = _tensors(seed)
        save_file(tensors, str(tmp_path / "theirs"), metadata=metadata)
        write_tensor_file(tensors, tmp_path / "ours", metadata)
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
        lazy = LazyTensors.open(tmp_path / "ours")
        assert set(lazy) == set(tensors) and len(lazy) == len(tensors)
        for name, value in tensors.items():
            assert lazy[name].dtype == value.dtype and torch.equal(lazy[name], value)
        write_tensor_file({name: stored(lazy, name) for name in lazy}, tmp_path / "copied", metadata)
        assert (tmp_path / "copied").read_bytes() == (tmp_path / "theirs").read_bytes()
        if metadata:
            assert lazy.file.metadata == metadata


def test_views_read_only_their_keys_and_survive_the_file_being_replaced(tmp_path) -> None:
    """A view of one prefix holds only its keys; what was opened stays readable (the same
    bytes) after the path is replaced or removed, and a pickled file opens its path again."""
    tensors = _tensors(0)
    path = tmp_path / "a.safetensors"
    write_tensor_file(tensors, path)
    lazy = LazyTensors.open(path)
    layer = subset(lazy, "layers.1.")
    assert isinstance(layer, LazyTensors)
    assert set(layer) == {k.removeprefix("layers.1.") for k in tensors if k.startswith("layers.1.")}
    assert "t0" not in layer and set(subset(lazy, "layers.1.", ["t1"])) == {"t1"}
    with pytest.raises(KeyError):
        layer["t0"]
    plain = subset(tensors, "layers.1.")  # (a dict: the same keys and values, already in memory)
    assert set(plain) == set(layer) and all(torch.equal(plain[k], layer[k]) for k in layer)
    before = {k: layer[k] for k in layer}
    write_tensor_file({"other": torch.ones(3)}, tmp_path / "b.safetensors")
    os.replace(tmp_path / "b.safetensors", path)  # (an artifact rewritten in place)
    assert all(torch.equal(layer[k], v) for k, v in before.items())
    path.unlink()
    assert all(torch.equal(layer[k], v) for k, v in before.items())
    write_tensor_file(tensors, path)
    again = pickle.loads(pickle.dumps(lazy.file))
    assert isinstance(again, TensorFile) and set(again.keys()) == set(tensors)


def test_truncated_or_foreign_files_are_refused(tmp_path) -> None:
    path = tmp_path / "a.safetensors"
    write_tensor_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    (tmp_path / "short").write_bytes(data[:-100])
    with pytest.raises(TensorFileError, match="runs past the end"):
        TensorFile(tmp_path / "short")
    (tmp_path / "tiny").write_bytes(b"abc")
    with pytest.raises(TensorFileError, match="too short"):
        TensorFile(tmp_path / "tiny")
    (tmp_path / "text").write_bytes((20).to_bytes(8, "little") + b"not json at all" + b" " * 20)
    with pytest.raises(TensorFileError, match="not JSON"):
        TensorFile(tmp_path / "text")
    assert torch.equal(load_file(str(path))["w"], LazyTensors.open(path)["w"])
