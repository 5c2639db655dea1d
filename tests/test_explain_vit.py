"""Grad-CAM on vision transformers: token -> grid reshape, default layer, register tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.data import LABELS
from histoclass.explain import candidate_layers, explain_image, find_target_layer
from histoclass.explain.tokens import token_reshape
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

CLASSES = list(LABELS)
S = 160  # test_vit: patch 16 -> a 10x10 token grid


def blob(rng: np.random.Generator, malignant: bool, h: int = S, w: int = S):
    """Pink noise; malignant images carry a dark purple disc inside a random quadrant."""
    img = rng.normal(0, 12, (h, w, 3)) + np.array([225, 170, 200])
    quadrant = int(rng.integers(4))
    if malignant:
        cy = (quadrant // 2) * h // 2 + int(rng.integers(h // 8, 3 * h // 8))
        cx = (quadrant % 2) * w // 2 + int(rng.integers(w // 8, 3 * w // 8))
        yy, xx = np.mgrid[:h, :w]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 16**2] = [70, 30, 110]
    return np.clip(img, 0, 255).astype(np.uint8), quadrant


@pytest.fixture(scope="module")
def vit():
    """test_vit with 2 register tokens, trained (seeded) to call dark-disc images malignant."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("test_vit", 2, pretrained=False, drop_rate=0.0,
                         model_args={"reg_tokens": 2, "dynamic_img_size": True})
    pre = model_preprocess(model, S)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(60):
        ys = rng.integers(0, 2, 16)
        xs = torch.stack([pre.normalize(blob(rng, bool(y))[0]) for y in ys])
        loss = torch.nn.functional.cross_entropy(model(xs), torch.from_numpy(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), pre


def test_reshape_drops_prefix_tokens_and_lays_patches_on_the_grid():
    model = create_model("test_vit", 2, pretrained=False, model_args={"reg_tokens": 2})
    x = torch.zeros(1, 3, S, S)
    tokens = torch.arange(2 * 103 * 4, dtype=torch.float32).reshape(2, 103, 4)
    grid = token_reshape(model, x)(tokens)
    assert grid.shape == (2, 4, 10, 10)
    # patch token k (after 1 class + 2 register tokens) sits at row k // 10, column k % 10
    assert torch.equal(grid[1, :, 3, 7], tokens[1, 3 + 37])
    assert token_reshape(create_model("test_efficientnet", 2, pretrained=False), x) is None


def test_default_layer_and_candidates(vit):
    model, _ = vit
    assert find_target_layer(model)[0] == "blocks.5.norm1"
    assert candidate_layers(model, 3) == ["blocks.5.norm1", "blocks.4.norm1", "blocks.3.norm1"]
    with pytest.raises(ValueError, match=r"layer 'nope' not found .*blocks\.5\.norm1"):
        find_target_layer(model, "nope")


@pytest.mark.parametrize("layer, least", [(None, 8), ("blocks.4.norm1", 10)])
def test_vit_map_peaks_at_the_blob_and_releases_hooks(vit, layer, least):
    # Chance is 3 of 12 quadrants; P(>= 8 of 12 by chance) = 0.003. Measured: 8 at the default
    # (last block: patch tokens reach the class token only through its attention), 12 one
    # block earlier.
    model, pre = vit
    rng = np.random.default_rng(123)
    hits = 0
    for _ in range(12):
        image, quadrant = blob(rng, True, h=240, w=320)  # larger, non-square: map upsampled
        e = explain_image(model, image, pre, CLASSES, target="malignant", layer=layer)
        assert e.cam.shape == (240, 320) and e.layer == (layer or "blocks.5.norm1")
        h, w = 120, 160
        q = [e.cam[:h, :w], e.cam[:h, w:], e.cam[h:, :w], e.cam[h:, w:]]
        hits += int(np.argmax([c.sum() for c in q]) == quadrant)
    assert hits >= least, hits
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_frozen_vit_and_every_method(vit, caplog):
    from histoclass.explain import METHODS

    model, pre = vit
    image, _ = blob(np.random.default_rng(7), True)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for method in METHODS:
            e = explain_image(model, image, pre, CLASSES, method=method)
            assert e.cam.shape == image.shape[:2] and np.isfinite(e.cam).all(), method
            # grad-cam++'s weights can all be negative on LayerNorm tokens: then it says so
            empty = f"the {method} map is empty at this layer" in caplog.text
            assert (e.cam.max() > 0) != empty, method
            caplog.clear()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_cli_layer_list_and_explain_a_vit_member(vit, tmp_path):
    model, pre = vit
    meta = member_meta("vit", "test_vit", CLASSES, pre, drop_rate=0.0,
                       model_args={"reg_tokens": 2, "dynamic_img_size": True})
    path = save_checkpoint(tmp_path / "vit.pt", model, meta)
    res = CliRunner().invoke(app, ["explain", str(path), "--layer", "list"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("vit: default blocks.5.norm1; candidates blocks.5.norm1, ")
    img = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(blob(np.random.default_rng(3), True, 230, 350)[0]).save(img)
    res = CliRunner().invoke(app, ["explain", str(path), str(img), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "index.html").exists()
