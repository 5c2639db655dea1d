"""The torch Dataset: model preprocessing, augmentation, and the decoded-image cache."""

import numpy as np
import pytest
import torch

from histoclass.data import dataset as ds
from histoclass.data.breakhis import SUBTYPES
from histoclass.data.scan import scan
from histoclass.data.splits import make_split
from histoclass.data.transforms import Augment, HedJitter, Preprocess

PRE = Preprocess((32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


@pytest.fixture
def frame(class_folder_tree):
    return make_split(scan(class_folder_tree).frame, "patient", seed=0)


def test_item_is_normalised_model_input(frame):
    data = ds.ManifestDataset(frame, PRE)
    x, y = data[0]
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    raw = torch.from_numpy(data.image(0)).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25)
    assert y == ["benign", "malignant"].index(frame["label"][0])


def test_subtype_targets(frame):
    data = ds.ManifestDataset(frame, PRE, classes=SUBTYPES, target="subtype")
    assert sorted(set(data.targets)) == list(range(8))


def test_unknown_target_value_is_named(frame):
    bad = frame.assign(label=["benign"] * (len(frame) - 1) + ["tumour"])
    with pytest.raises(ValueError, match=r"label value\(s\) \['tumour'\] .* not in classes"):
        ds.ManifestDataset(bad, PRE)


def test_cache_gives_identical_items_and_skips_decoding(frame, tmp_path, monkeypatch):
    plain = ds.ManifestDataset(frame, PRE)
    cached = ds.ManifestDataset(frame, PRE, cache_dir=tmp_path / "cache")
    for i in range(len(frame)):
        assert torch.equal(plain[i][0], cached[i][0])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(frame)

    expected = plain[3][0]

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(ds, "load_rgb", no_decoding)
    assert torch.equal(cached[3][0], expected)


def test_cache_key_changes_with_size_and_stain(frame, tmp_path):
    img = ds.ManifestDataset(frame, PRE, cache_dir=tmp_path).image(0)
    other = Preprocess((16, 16), PRE.mean, PRE.std, "bilinear")
    assert ds.ManifestDataset(frame, other, cache_dir=tmp_path).image(0).shape == (16, 16, 3)
    inv = ds.ManifestDataset(frame, PRE, cache_dir=tmp_path, stain=lambda a: 255 - a,
                             stain_key="invert")
    assert np.array_equal(inv.image(0), 255 - img)


def test_training_augmentation_is_random_and_eval_is_not(frame):
    train = ds.ManifestDataset(frame, PRE, train=True)
    evald = ds.ManifestDataset(frame, PRE)
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(4)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(evald[0][0], evald[0][0])


def test_hed_jitter_zero_sigma_is_identity_and_positive_sigma_changes_colour():
    img = torch.randint(30, 220, (3, 8, 8), dtype=torch.uint8)
    same = HedJitter(0.0)(img)
    assert (same.int() - img.int()).abs().max() <= 1  # round trip through optical density
    torch.manual_seed(0)
    assert (HedJitter(0.2)(img).int() - img.int()).abs().float().mean() > 1


def test_augment_pipeline_keeps_shape_and_dtype():
    aug = Augment(color_jitter=0.1, hed_jitter=0.05).build()
    out = aug(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8


def test_preprocess_round_trip_and_timm_config():
    cfg = {"input_size": (3, 224, 224), "mean": (0.1, 0.2, 0.3), "std": (1, 1, 1),
           "interpolation": "bicubic", "crop_pct": 0.875}
    pre = Preprocess.from_data_config(cfg, image_size=128)
    assert pre.input_size == (128, 128)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="interpolation 'box' not supported"):
        Preprocess.from_data_config({**cfg, "interpolation": "box"})
