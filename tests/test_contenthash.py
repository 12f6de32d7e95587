import pytest

from seap.contenthash import code_digest, stage_key, tree_digest


def test_tree_digest_tracks_content_not_time(tmp_path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("x")
    (d / "sub" / "b.txt").write_text("y")
    first = tree_digest(d)
    (d / ".a.txt.tmp").write_text("half-written")  # hidden temp files are ignored
    assert tree_digest(d) == first
    (d / "sub" / "b.txt").write_text("z")
    assert tree_digest(d) != first
    with pytest.raises(FileNotFoundError):
        tree_digest(tmp_path / "missing")


def test_stage_key_changes_with_params_inputs_and_code(tmp_path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text("1")
    key = stage_key("masks", {"sparsity": 0.2}, {"scores": f}, ["seap.maths.masks"])
    assert key == stage_key("masks", {"sparsity": 0.2}, {"scores": f}, ["seap.maths.masks"])
    assert key.startswith("masks-")
    assert key != stage_key("masks", {"sparsity": 0.5}, {"scores": f}, ["seap.maths.masks"])
    assert key != stage_key("masks", {"sparsity": 0.2}, {"scores": f}, ["seap.maths.masks", "seap.maths.schedules"])
    f.write_text("2")
    assert key != stage_key("masks", {"sparsity": 0.2}, {"scores": f}, ["seap.maths.masks"])
    assert code_digest(["seap.maths.moments"]) != code_digest(["seap.model.calibration"])
