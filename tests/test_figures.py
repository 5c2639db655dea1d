"""What people look at: explanation figures, the overlay rule, training curves, and explain
outputs that no later scan takes for data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histoclass.data.files import OUTPUT_MARKER, mark_output
from histoclass.data.scan import ScanError, scan
from histoclass.explain import EnsembleExplanation, Explanation, ensemble_figure, overlay
from histoclass.explain.figures import CMAP, css_gradient, explanation_figure, heat_rgba
from histoclass.train.records import plot_history

CLASSES = ["benign", "malignant"]


def _explanation(h: int = 46, w: int = 70) -> tuple[np.ndarray, Explanation]:
    image = np.full((h, w, 3), 200, np.uint8)
    cam = np.zeros((h, w), np.float32)
    cam[: h // 2, : w // 2] = 1.0  # one hot quarter
    return image, Explanation(cam, np.array([0.2, 0.8]), 1, CLASSES, "gradcam", "bn2")


def test_colour_map_is_perceptually_uniform_and_matches_the_web_colour_bar():
    from matplotlib import colormaps

    assert CMAP in {"viridis", "inferno", "magma", "cividis", "plasma"}
    first, last = colormaps[CMAP](0.0), colormaps[CMAP](1.0)
    hexes = css_gradient(2).removeprefix("linear-gradient(to right, ").removesuffix(")")
    assert hexes.split(", ") == ["#{:02x}{:02x}{:02x}".format(*(int(255 * c + 0.5)
                                                               for c in rgb[:3]))
                                 for rgb in (first, last)]


def test_overlay_tints_only_where_the_map_is_high():
    image, e = _explanation()
    out = overlay(image, e.cam, alpha=0.6)
    np.testing.assert_array_equal(out[-1, -1], image[-1, -1])  # map 0: tissue unchanged
    from matplotlib import colormaps

    top = np.array(colormaps[CMAP](1.0)[:3]) * 255
    np.testing.assert_allclose(out[0, 0], 0.4 * 200 + 0.6 * top, atol=1)  # map 1: alpha blend
    rgba = heat_rgba(e.cam)
    assert rgba.shape == (46, 70, 4) and rgba[0, 0, 3] == 255 and rgba[-1, -1, 3] == 0


def test_figure_shows_field_map_overlay_colour_bar_prediction_and_truth():
    image, e = _explanation()
    fig = explanation_figure(image, e, "x.png", label="benign")
    assert [ax.get_title() for ax in fig.axes] == [
        "field (70x46 px)", "heat map: gradcam @ bn2", "overlay: what points to malignant"]
    title = fig._suptitle.get_text()
    assert title == "x.png: predicted malignant (p(malignant)=0.800); true benign: WRONG"
    assert len(fig.axes[1].child_axes) == 1  # the colour bar, inset
    bar = fig.axes[1].child_axes[0]
    assert "0 = no influence" in bar.get_xlabel() and CMAP in bar.get_xlabel()
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), image)  # plain field
    assert fig.axes[1].images[0].get_cmap().name == CMAP
    assert "true label unknown" in explanation_figure(image, e)._suptitle.get_text()


def test_ensemble_figures_name_the_fused_map(tmp_path):
    image, e = _explanation()
    ens = EnsembleExplanation([("a", 0.5, e), ("b", 0.5, e)], e.cam, e.probs, 1, CLASSES)
    assert explanation_figure(image, ens).axes[1].get_title() == (
        "heat map: gradcam, fused over 2 members")
    grid = ensemble_figure(image, ens, label="malignant")
    assert len(grid.axes) == 3 and "true malignant: correct" in grid._suptitle.get_text()


def _history(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 0.5 / e,
             "val_accuracy": 1 - 0.6 / e, "val_balanced_accuracy": float(rng.uniform(0.5, 1)),
             "val_loss": 1.2 / e, "val_auc": None if e == 2 else 1 - 0.3 / e, "lr": 1e-4,
             "seconds": 1.0, "images_per_s": 10.0} for e in range(1, n + 1)]


@pytest.mark.parametrize("n", [1, 3, 40])
def test_curves_panel_per_metric_integer_epochs_legend_off_the_data(n, tmp_path):
    fig = plot_history(_history(n), tmp_path / "curves.png", "balanced_accuracy",
                       best_epoch=min(n, 2))
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["cross-entropy loss", "accuracy", "balanced accuracy (selects best.pt)",
                      "ROC-AUC"]
    for ax, kinds in zip(fig.axes, [{"training", "validation"}, {"training", "validation"},
                                    {"validation"}, {"validation"}], strict=True):
        labels = {line.get_label() for line in ax.get_lines()}
        assert kinds <= labels and any(lab.startswith("best.pt: epoch") for lab in labels)
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks)
        best = [line for line in ax.get_lines() if line.get_label().startswith("best.pt")]
        assert list(best[0].get_xdata()) == [min(n, 2)] * 2
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    for ax in fig.axes:
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["training", "validation",
                     f"best.pt: epoch {min(n, 2)} (best validation balanced accuracy)"]


def test_folders_histoclass_wrote_are_refused_or_left_out(class_folder_tree, tmp_path):
    out = class_folder_tree / "cams"
    out.mkdir()
    for p in list(class_folder_tree.rglob("*.png"))[:3]:  # figures named like their images
        Image.open(p).save(out / p.name)
    marker = mark_output(out, "explain")
    assert marker.name == OUTPUT_MARKER and "explain" in marker.read_text()
    result = scan(class_folder_tree)
    assert not any(p.startswith(str(out)) for p in result.frame["path"])
    assert [p for p, _ in result.skipped if p == str(out)] == [str(out)]
    with pytest.raises(ScanError, match=r"cams was written by histoclass .*figures, not data"):
        scan(out)
    with pytest.raises(ScanError, match="written by histoclass"):
        (out / "sub").mkdir()
        scan(out / "sub")


def test_split_and_predict_refuse_an_explain_folder(class_folder_tree, tmp_path):
    from typer.testing import CliRunner

    from histoclass.cli import app
    from histoclass.predict import expand_inputs

    out = tmp_path / "cams"
    out.mkdir()
    Image.open(next(class_folder_tree.rglob("*.png"))).save(out / "benign.overlay.png")
    mark_output(out, "explain")
    res = CliRunner().invoke(app, ["split", str(out), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "was written by histoclass" in res.output
    info, skipped = expand_inputs([out])
    assert info.empty and skipped[0][0] == str(out) and "figures, not data" in skipped[0][1]
