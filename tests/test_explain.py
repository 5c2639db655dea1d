"""Explanations: full-resolution maps, localisation, hooks, ensembles, figures, CLI gallery."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histoclass.data import LABELS, load_rgb
from histoclass.data.images import to_array
from histoclass.data.manifest import sample_path
from histoclass.explain import METHODS, explain_ensemble, explain_image, find_target_layer
from histoclass.models import (
    Member,
    create_model,
    load_member,
    member_meta,
    model_preprocess,
    save_checkpoint,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = list(LABELS)
S = 128  # model input: test_efficientnet's stride 32 gives a 4x4 map, enough for quadrants


def blob_image(rng: np.random.Generator, malignant: bool, h: int = S, w: int = S
               ) -> tuple[np.ndarray, int]:
    """Pink noise; malignant images carry a dark purple disc inside a random quadrant."""
    img = rng.normal(0, 12, (h, w, 3)) + np.array([225, 170, 200])
    quadrant = int(rng.integers(4))
    if malignant:
        cy = (quadrant // 2) * h // 2 + int(rng.integers(h // 8, 3 * h // 8))
        cx = (quadrant % 2) * w // 2 + int(rng.integers(w // 8, 3 * w // 8))
        yy, xx = np.mgrid[:h, :w]
        img[((yy - cy) / (h / S)) ** 2 + ((xx - cx) / (w / S)) ** 2 < 11**2] = [70, 30, 110]
    return np.clip(img, 0, 255).astype(np.uint8), quadrant


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: less contention, steadier speed
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    """test_efficientnet trained (seeded) to call images with a dark disc malignant."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("test_efficientnet", 2, pretrained=False, drop_rate=0.0)
    pre = model_preprocess(model, S)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(30):
        ys = rng.integers(0, 2, 16)
        xs = torch.stack([pre.normalize(blob_image(rng, bool(y))[0]) for y in ys])
        loss = torch.nn.functional.cross_entropy(model(xs), torch.from_numpy(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), pre


@pytest.fixture(scope="module")
def other():
    torch.manual_seed(1)
    model = create_model("test_efficientnet", 2, pretrained=False).eval()
    return model, model_preprocess(model, S)


@pytest.fixture(scope="module")
def checkpoints(trained, other, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for name, (model, pre) in (("a", trained), ("b", other)):
        meta = member_meta("test_efficientnet", "test_efficientnet", CLASSES, pre, drop_rate=0.0)
        paths.append(str(save_checkpoint(root / f"{name}.pt", model, meta)))
    return paths


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("method", list(METHODS))
def test_map_full_resolution_on_bundled_sample(trained, method):
    model, pre = trained
    image = to_array(load_rgb(sorted(sample_path("breakhis").glob("*.png"))[0]))
    e = explain_image(model, image, pre, CLASSES, method=method)
    assert e.cam.shape == image.shape[:2] != pre.input_size
    assert e.cam.min() >= 0 and e.cam.max() <= 1
    assert e.cam.std() > 0.01
    assert np.isclose(e.probs.sum(), 1) and e.layer == "bn2"


def test_map_on_shared_real_image(trained):
    images = sorted((SHARED / "ucsb-breast" / "images").glob("*.png"))
    if not images:
        pytest.skip(f"../shared/data absent: no UCSB images under {SHARED}")
    image = to_array(load_rgb(images[0]))
    e = explain_image(trained[0], image, trained[1], CLASSES, target="malignant")
    assert e.cam.shape == image.shape[:2]
    assert e.cam.min() >= 0 and e.cam.max() <= 1 and e.cam.std() > 0.01


def test_cam_mass_peaks_at_the_blob_on_held_out_images(trained):
    model, pre = trained
    rng = np.random.default_rng(123)
    hits = 0
    for _ in range(12):
        # Non-square and larger than the input: the map must be upsampled to line up.
        image, quadrant = blob_image(rng, True, h=192, w=256)
        e = explain_image(model, image, pre, CLASSES, target="malignant")
        assert e.cam.shape == (192, 256)
        q = [e.cam[:96, :128], e.cam[:96, 128:], e.cam[96:, :128], e.cam[96:, 128:]]
        hits += int(np.argmax([c.sum() for c in q]) == quadrant)
    assert hits >= 11


def test_hooks_released_and_models_do_not_interfere(trained, other):
    image = to_array(load_rgb(sorted(sample_path("breakhis").glob("*.png"))[1]))
    b_alone = explain_image(other[0], image, other[1], CLASSES, target="malignant").cam
    explain_image(trained[0], image, trained[1], CLASSES, method="gradcam++")
    b_after = explain_image(other[0], image, other[1], CLASSES, target="malignant").cam
    np.testing.assert_allclose(b_after, b_alone, atol=1e-6)
    for model, _ in (trained, other):
        assert _hooks(model) == 0
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert not model.training


def test_frozen_backbone_works_and_stays_frozen(trained):
    model, pre = trained
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        image, _ = blob_image(np.random.default_rng(5), True)
        e = explain_image(model, image, pre, CLASSES, method="layercam")
        assert e.cam.std() > 0.01 and e.target == e.pred
        assert not any(p.requires_grad for p in model.parameters()) and _hooks(model) == 0
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_wrong_layer_name_lists_candidates(trained):
    with pytest.raises(ValueError, match=r"layer 'head9' not found .*candidate layers.*conv_head"):
        find_target_layer(trained[0], "head9")
    image, _ = blob_image(np.random.default_rng(0), True)
    e = explain_image(trained[0], image, trained[1], CLASSES, layer="blocks.4.0.bn3")
    assert e.layer == "blocks.4.0.bn3" and e.cam.shape == image.shape[:2]


def test_ensemble_fuses_normalised_weights_and_grid_has_a_panel_per_member(trained, other):
    from histoclass.explain import ensemble_figure

    image, _ = blob_image(np.random.default_rng(7), True, h=150, w=200)
    members = [Member(name, model, {}, pre, None)
               for name, (model, pre) in (("a", trained), ("b", other), ("a2", trained))]
    ens = explain_ensemble(members, image, CLASSES, weights=[1.0, 3.0, 0.0], target="malignant")
    assert [w for _, w, _ in ens.members] == [0.25, 0.75, 0.0]
    expected = 0.25 * ens.members[0][2].cam + 0.75 * ens.members[1][2].cam
    np.testing.assert_allclose(ens.cam, expected, atol=1e-6)
    np.testing.assert_allclose(ens.probs, 0.25 * ens.members[0][2].probs
                               + 0.75 * ens.members[1][2].probs)
    fig = ensemble_figure(image, ens)
    assert len(fig.axes) == len(members) + 1
    assert "ensemble" in fig.axes[-1].get_title()
    with pytest.raises(ValueError, match="weights must be >= 0"):
        explain_ensemble(members[:1], image, CLASSES, weights=[-1.0])


def test_single_figure_shows_prediction(trained):
    from histoclass.explain import explanation_figure, overlay

    image, _ = blob_image(np.random.default_rng(8), True)
    e = explain_image(*trained[:1], image, trained[1], CLASSES)
    fig = explanation_figure(image, e, "x.png")
    title = fig._suptitle.get_text()
    pred = CLASSES[e.pred]
    assert f"x.png: predicted {pred} (p({pred})={e.probs[e.pred]:.3f})" in title
    assert overlay(image, e.cam).shape == image.shape


def test_stain_from_checkpoint(checkpoints, monkeypatch, tmp_path):
    from histoclass.models import load_checkpoint

    model, meta = load_checkpoint(checkpoints[0])
    meta["stain"] = {"method": "reinhard"}
    path = save_checkpoint(tmp_path / "s.pt", model, meta)
    seen = []
    fake = type(sys)("histoclass.stain")
    fake.from_dict = lambda d: lambda img: seen.append(img.shape) or 255 - img
    monkeypatch.setitem(sys.modules, "histoclass.stain", fake)
    member = load_member(str(path))
    image, _ = blob_image(np.random.default_rng(9), True)
    explain_image(member.model, image, member.preprocess, CLASSES, stain=member.stain)
    assert seen == [image.shape]


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(11)
    for label, n in (("malignant", 2), ("benign", 1)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(blob_image(rng, label == "malignant", 150, 200)[0]).save(
                root / label / f"{label}{i}.png")
    # A benign-looking image filed as malignant: the model calls it benign, so it is misclassified.
    Image.fromarray(blob_image(rng, False)[0]).save(root / "malignant" / "mislabelled.png")
    (root / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_cli_batch_writes_overlays_gallery_and_names_corrupt_file(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app

    data, out = _folder(tmp_path / "data"), tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", checkpoints[0], str(data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "skipped broken.png" in res.output
    for name in ("malignant0", "malignant1", "benign0", "mislabelled"):
        assert (out / f"{name}.cam.png").is_file()
        overlay = Image.open(out / f"{name}.overlay.png")
        assert overlay.size == Image.open(next(data.rglob(f"{name}.png"))).size
    page = (out / "index.html").read_text()
    assert "broken.png" in page.split('id="skipped"')[1]
    assert "<script" in page and "http" not in page  # self-contained: no external resources
    first_row = page.split("<tbody>")[1].split("</tr>")[0]
    assert 'class="wrong"' in first_row and "mislabelled.png" in first_row


def test_cli_soft_ensemble_of_member_checkpoints(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app

    image = tmp_path / "one.png"
    Image.fromarray(blob_image(np.random.default_rng(3), True)[0]).save(image)
    args = ["explain", *checkpoints, str(image), "--out", str(tmp_path / "o"),
            "--ensemble-weights", "1,3", "--method", "eigencam"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "one.cam.png").is_file()
    bad = CliRunner().invoke(app, [*args[:-4], "--ensemble-weights", "1"])
    assert bad.exit_code == 2 and "one weight per checkpoint" in bad.output
    wrong = CliRunner().invoke(app, ["explain", checkpoints[0], str(image), "--out",
                                     str(tmp_path / "w"), "--layer", "nope"])
    assert wrong.exit_code == 2 and "candidate layers" in wrong.output
    method = CliRunner().invoke(app, ["explain", checkpoints[0], str(image), "--out",
                                      str(tmp_path / "w"), "--method", "scorecam"])
    assert method.exit_code == 2 and "unknown CAM method 'scorecam'" in method.output
    klass = CliRunner().invoke(app, ["explain", checkpoints[0], str(image), "--out",
                                     str(tmp_path / "w"), "--class", "tumour"])
    assert klass.exit_code == 2 and "unknown class 'tumour'" in klass.output


def test_cli_score_table_and_gradcam_beats_random(checkpoints, trained, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app
    from histoclass.explain import score_methods

    rng = np.random.default_rng(21)
    images = [blob_image(rng, True)[0] for _ in range(4)]
    rows = {r["method"]: r for r in score_methods(trained[0], trained[1], images, CLASSES,
                                                  ["gradcam"], target="malignant")}
    assert rows["gradcam"]["ins_minus_del"] > rows["random"]["ins_minus_del"]
    assert rows["gradcam"]["deletion"] < rows["random"]["deletion"]
    path = tmp_path / "i.png"
    Image.fromarray(images[0]).save(path)
    res = CliRunner().invoke(app, ["explain", checkpoints[0], str(path), "--score",
                                   "--methods", "gradcam,eigencam", "--steps", "4"])
    assert res.exit_code == 0, res.output
    for word in ("method", "deletion", "insertion", "sec_per_image", "gradcam", "eigencam",
                 "random"):
        assert word in res.output


def test_fast_eigen_projection_matches_grad_cam():
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    from histoclass.explain import eigen_projection

    acts = np.random.default_rng(0).random((2, 64, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(eigen_projection(acts),
                               get_2d_projection_with_sign_correction(acts), atol=1e-4)


def test_cli_manifest_split_and_caller_grads_kept(checkpoints, trained, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app
    from histoclass.data import write_manifest

    rng = np.random.default_rng(4)
    rows = []
    for i, (label, split) in enumerate((("malignant", "test"), ("benign", "test"),
                                        ("malignant", "train"))):
        path = tmp_path / f"m{i}.png"
        Image.fromarray(blob_image(rng, label == "malignant")[0]).save(path)
        rows.append({"path": path.name, "label": label, "patient_id": f"p{i}", "split": split})
    import pandas as pd

    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "manifest.csv")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", checkpoints[0], "--manifest", str(manifest),
                                   "--split", "test", "--out", str(out), "--class", "malignant"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.overlay.png")) == ["m0.overlay.png",
                                                                 "m1.overlay.png"]
    csv = pd.read_csv(out / "explanations.csv")
    assert list(csv["correct"]) == ["yes", "yes"]
    # Explaining mid-training must not wipe the caller's accumulated gradients.
    model, pre = trained
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    try:
        explain_image(model, blob_image(rng, True)[0], pre, CLASSES)
        assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    finally:
        model.classifier.weight.grad = None


def test_cli_explains_an_ensemble_file_weighted_like_the_ensemble(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app
    from histoclass.explain import cam_weights
    from histoclass.models.ensemble import Ensemble, load_member, load_model_file

    members = [load_member(p) for p in checkpoints]
    path = Ensemble(members, "weighted", weights=[0.25, 0.75],
                    member_paths=checkpoints).save(tmp_path / "ens.pt")
    ens = load_model_file(path)
    assert cam_weights(ens) == [0.25, 0.75]
    image = blob_image(np.random.default_rng(5), True)[0]
    inputs = [x.unsqueeze(0) for x in ens.prepare(Image.fromarray(image))]
    np.testing.assert_allclose(ens.predict_images([image]).proba[0],
                               ens.predict_proba(inputs).proba[0].numpy())

    Image.fromarray(image).save(tmp_path / "one.png")
    res = CliRunner().invoke(app, ["explain", str(path), str(tmp_path / "one.png"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "one.overlay.png").is_file()
    both = CliRunner().invoke(app, ["explain", str(path), checkpoints[0],
                                    str(tmp_path / "one.png"), "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "is an ensemble file: explain it alone" in both.output


@pytest.mark.parametrize(("method", "params", "weights"), [
    ("weighted", {"weights": [0.25, 0.75]}, [0.25, 0.75]),
    # Stacking: each member's map counts by the positive part of its coefficient, normalised.
    ("stack", {"stack": {"coef": [[2.0, -1.0]], "intercept": [0.1]}}, [1.0, 0.0]),
])
def test_cli_and_api_draw_the_same_fused_map(checkpoints, tmp_path, method, params, weights):
    from typer.testing import CliRunner

    import histoclass
    from histoclass.cli import app
    from histoclass.models.ensemble import Ensemble

    members = [load_member(p) for p in checkpoints]
    path = Ensemble(members, method, member_paths=checkpoints, **params).save(
        tmp_path / f"{method}.pt")
    image = blob_image(np.random.default_rng(6), True, h=150, w=200)[0]
    Image.fromarray(image).save(tmp_path / "one.png")
    res = CliRunner().invoke(app, ["explain", str(path), str(tmp_path / "one.png"), "--out",
                                   str(tmp_path / method), "--maps"])
    assert res.exit_code == 0, res.output
    by_cli = np.load(tmp_path / method / "one.cam.npy")
    by_api = histoclass.load(path).explain(image)
    np.testing.assert_allclose(by_cli, by_api.cam, atol=1e-6)
    target = CLASSES.index(by_api.target)
    by_hand = sum(w * explain_image(m.model, image, m.preprocess, CLASSES, target=target).cam
                  for w, m in zip(weights, members, strict=True))
    np.testing.assert_allclose(by_api.cam, np.clip(by_hand, 0, 1), atol=1e-6)
