"""Reading a mask of any kind by the format its metadata records, and applying it by that format."""

import json

import pytest
import torch

from seap.errors import ArtifactError, SeapError
from seap.maths.expert_selection import ExpertMask
from seap.maths.geometry import LayerGeometry, ModelGeometry
from seap.maths.mask_formats import MASK_FORMATS, Mask, load_mask, mask_class
from seap.maths.masks import PruningMask, full_mask
from seap.model.masking import APPLIERS, apply_mask
from tests.helpers import make_tiny_model


def _dense() -> PruningMask:
    return full_mask(ModelGeometry(8, (LayerGeometry(2, 1, 4, 16),)), "sha256:base")


def _experts() -> ExpertMask:
    return ExpertMask({0: torch.tensor([True, False, True, True])}, {0: 2}, {"base_fingerprint": "sha256:base"})


def test_every_mask_kind_offers_the_protocol_and_is_registered_for_reading_and_applying() -> None:
    assert set(MASK_FORMATS) == set(APPLIERS) == {"seap-mask", "seap-expert-mask"}
    for mask in (_dense(), _experts()):
        assert isinstance(mask, Mask)
        assert MASK_FORMATS[mask.format] is type(mask) and mask.format == type(mask).artifact.format


def test_load_mask_picks_the_class_of_the_recorded_format(tmp_path) -> None:
    for name, mask in (("dense", _dense()), ("experts", _experts())):
        mask.save(tmp_path / name)
        again = load_mask(tmp_path / name)
        assert type(again) is type(mask) and again.digest() == mask.digest()


def test_a_folder_without_mask_metadata_is_refused_by_the_dense_reader(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert mask_class(tmp_path / "empty") is PruningMask
    with pytest.raises(ArtifactError):
        load_mask(tmp_path / "empty")


def test_an_unknown_recorded_format_goes_to_the_reader_of_its_file(tmp_path) -> None:
    _experts().save(tmp_path / "m")
    meta = tmp_path / "m" / ExpertMask.artifact.meta_file
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "seap-other"}))
    assert mask_class(tmp_path / "m") is ExpertMask
    with pytest.raises(ArtifactError, match="not a seap-expert-mask folder"):
        load_mask(tmp_path / "m")


def test_apply_mask_refuses_an_object_of_no_registered_format() -> None:
    loaded = make_tiny_model("llama-mha")
    with pytest.raises(SeapError, match="unknown pruning mode"):
        apply_mask(loaded, object(), "medium")  # (the mode is checked first, as before)
    with pytest.raises(SeapError, match="no applier"):
        apply_mask(loaded, object(), "hard")
