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


def test_a_package_digest_covers_every_module_in_it(tmp_path, monkeypatch) -> None:
    """A stage listing a package (``seap.model.adapters``) must re-run when any module inside it changes,
    not only its ``__init__``."""
    import importlib
    import sys

    from seap.contenthash import module_digest

    digest = module_digest.__wrapped__  # (uncached: the package changes within the test)
    package = tmp_path / "digestpkg"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "family.py").write_text("WIDTH = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = digest("digestpkg")
    (package / "inner" / "family.py").write_text("WIDTH = 2\n")
    importlib.invalidate_caches()
    assert digest("digestpkg") != before
    sys.modules.pop("digestpkg", None)
