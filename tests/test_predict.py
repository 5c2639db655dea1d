"""Predictions: CSV columns and round trip, bad files, TTA, stain handling, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from helpers_predict import fixed_member, index_batch, sample_manifest, train_member
from histoclass.cli import app
from histoclass.data import read_manifest, select
from histoclass.data.manifest import sample_path
from histoclass.data.transforms import Preprocess
from histoclass.models import CheckpointError, member_meta, save_checkpoint
from histoclass.models.ensemble import Ensemble, Member, dihedral, load_model_file
from histoclass.predict import predict_manifest, predict_paths, write_predictions

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    manifest = sample_manifest(root)
    return manifest, train_member(manifest, root / "m0.pt", seed=0)


def test_manifest_predictions_columns_and_round_trip(trained, tmp_path):
    manifest, ckpt = trained
    pred = predict_manifest(load_model_file(ckpt), manifest, "test", batch_size=5)
    test_rows = select(read_manifest(manifest), "test")
    assert list(pred.frame.columns) == ["path", "patient_id", "magnification", "label", "split",
                                        "protocol", "p_malignant", "pred", "confidence"]
    assert list(pred.frame["path"]) == list(test_rows["path"]) and pred.skipped == []
    assert set(pred.frame["split"]) == {"test"}
    p = pred.frame["p_malignant"].to_numpy()
    assert ((p >= 0) & (p <= 1)).all() and p.std() > 0  # trained: depends on the image
    assert list(pred.frame["pred"]) == ["malignant" if v > 0.5 else "benign" for v in p]
    assert pred.frame["confidence"].to_numpy() == pytest.approx(np.maximum(p, 1 - p))
    csv, skipped = write_predictions(pred, tmp_path / "preds.csv")
    back = pd.read_csv(csv, dtype={"patient_id": str, "magnification": str}, keep_default_na=False)
    pd.testing.assert_frame_equal(back, pred.frame, check_dtype=False)
    assert list(pd.read_csv(skipped).columns) == ["path", "reason"]


def test_bad_files_are_skipped_and_reported_rest_predicted(trained, tmp_path):
    _, ckpt = trained
    folder = tmp_path / "imgs" / "malignant"
    folder.mkdir(parents=True)
    good = sorted((sample_path("ucsb") / "malignant").glob("*.jpg"))[:3]
    for p in good:
        shutil.copy(p, folder)
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "notes.png").write_text("not an image at all")
    (folder / "readme.txt").write_text("hello")
    out = tmp_path / "out" / "preds.csv"
    res = CliRunner().invoke(app, ["predict", str(ckpt), str(tmp_path / "imgs"),
                                   str(tmp_path / "missing.png"), "--out", str(out),
                                   "--workers", "2", "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(frame["path"]) == sorted(str(folder / p.name) for p in good)
    assert set(frame["label"]) == {"malignant"}  # from the class folder
    skipped = pd.read_csv(out.with_name(f"{out.stem}.skipped.csv"))
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert set(reasons) == {str(folder / "truncated.jpg"), str(folder / "notes.png"),
                            str(folder / "readme.txt"), str(tmp_path / "missing.png")}
    assert "corrupt or truncated" in reasons[str(folder / "truncated.jpg")]
    assert "not an image" in reasons[str(folder / "notes.png")]
    assert "no such file" in reasons[str(tmp_path / "missing.png")]
    for p in reasons:
        assert p in res.output


def test_breakhis_names_fill_patient_magnification_label(trained):
    _, ckpt = trained
    files = sorted(sample_path("breakhis").glob("*.png"))
    frame = predict_paths(load_model_file(ckpt), files).frame
    assert list(frame.columns) == ["path", "patient_id", "magnification", "label",
                                   "p_malignant", "pred", "confidence"]
    row = frame[frame["path"].str.endswith("SOB_B_PT-14-29315EF-200-001.png")].iloc[0]
    assert (row["patient_id"], row["magnification"], row["label"]) == ("14-29315", "200X",
                                                                        "benign")


def test_unknown_names_leave_label_empty(trained, tmp_path):
    _, ckpt = trained
    img = tmp_path / "slide.jpg"
    shutil.copy(next((sample_path("ucsb") / "benign").glob("*.jpg")), img)
    frame = predict_paths(load_model_file(ckpt), [img]).frame
    assert frame.loc[0, ["patient_id", "magnification", "label"]].tolist() == ["", "", ""]


class Corner(nn.Module):
    """Not rotation invariant: logits from the top-left pixel."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), x[:, 0, 0, 0]], 1)


class MeanPixel(nn.Module):
    """Invariant under flips and rotations."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), x.mean((1, 2, 3))], 1)


def _single(module):
    pre = Preprocess((2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    meta = {"arch": "m", "classes": ["benign", "malignant"], "task": "binary", "stain": None}
    return Ensemble([Member("m", module, meta, pre, None)], "single")


def test_tta_averages_the_eight_dihedral_views():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).expand(1, 3, 2, 2).contiguous()
    assert len(dihedral(x)) == 8
    out = _single(Corner()).predict_proba([x], tta=True)
    # Each corner lands top-left in exactly 2 of the 8 views.
    expected = np.mean([1 / (1 + np.exp(-v)) for v in (1.0, 2.0, 3.0, -4.0)])
    assert out.proba.shape == (1, 2)
    assert out.proba[0, 1].item() == pytest.approx(expected, abs=1e-6)
    assert out.proba.sum().item() == pytest.approx(1.0)
    plain = _single(Corner()).predict_proba([x]).proba[0, 1].item()
    assert plain == pytest.approx(1 / (1 + np.exp(-1.0)))
    inv = _single(MeanPixel())
    xs = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(inv.predict_proba([xs], tta=True).proba,
                               inv.predict_proba([xs]).proba)


def test_tta_on_real_model_gives_valid_probabilities(trained):
    _, ckpt = trained
    files = sorted(sample_path("breakhis").glob("*.png"))[:3]
    ens = load_model_file(ckpt)
    plain = predict_paths(ens, files).frame["p_malignant"].to_numpy()
    tta = predict_paths(ens, files, tta=True).frame["p_malignant"].to_numpy()
    assert tta.shape == plain.shape and ((tta > 0) & (tta < 1)).all()


def test_checkpoint_with_an_unusable_stain_target_is_a_clear_error(tmp_path):
    from histoclass.models import create_model, model_preprocess

    model = create_model("test_efficientnet", 2, pretrained=False)
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, 32))
    meta["stain"] = {"method": "macenko"}  # no fitted stain vectors
    ckpt = save_checkpoint(tmp_path / "stained.pt", model, meta)
    with pytest.raises(CheckpointError, match=r"stained\.pt: stored stain target is unusable"):
        load_model_file(ckpt)


def test_fixed_member_helper_reads_row_index():
    m = fixed_member("a", [[0.2, 0.8], [0.7, 0.3]])
    p = m.model(index_batch(2)).softmax(-1)
    torch.testing.assert_close(p, torch.tensor([[0.2, 0.8], [0.7, 0.3]]))


def test_cli_needs_exactly_one_input_kind(trained, tmp_path):
    manifest, ckpt = trained
    runner = CliRunner()
    both = runner.invoke(app, ["predict", str(ckpt), str(tmp_path), "--manifest", str(manifest),
                               "--out", str(tmp_path / "p.csv")])
    assert both.exit_code == 2 and "either --manifest or image files" in both.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "nope.pt"), "--manifest",
                                  str(manifest), "--out", str(tmp_path / "p.csv")])
    assert missing.exit_code == 2 and "nope.pt does not exist" in missing.output


def test_subtype_task_has_one_probability_per_class(tmp_path):
    from histoclass.data import SUBTYPES
    from histoclass.models import create_model, model_preprocess

    ckpts = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = create_model("test_efficientnet", len(SUBTYPES), pretrained=False)
        meta = member_meta("test_efficientnet", "test_efficientnet", SUBTYPES,
                           model_preprocess(model, 32), task="subtype")
        ckpts.append(save_checkpoint(tmp_path / f"s{seed}.pt", model, meta))
    files = sorted(sample_path("breakhis").glob("*.png"))
    frame = predict_paths(load_model_file(ckpts[0]), files).frame
    probs = [f"p_{s}" for s in SUBTYPES]
    assert list(frame.columns) == ["path", "patient_id", "magnification", "label", "subtype",
                                   *probs, "pred", "confidence"]
    assert np.allclose(frame[probs].sum(axis=1), 1.0)
    assert list(frame["pred"]) == [SUBTYPES[i] for i in frame[probs].to_numpy().argmax(1)]
    mucinous = frame[frame["path"].str.contains("SOB_M_MC")]
    assert set(mucinous["subtype"]) == {"mucinous_carcinoma"}
    from histoclass.train import fit_ensemble

    ens_frame = predict_paths(fit_ensemble(ckpts, "soft"), files).frame
    member_cols = [f"member.test_efficientnet@s{i}.{p}" for i in range(2) for p in probs]
    assert [c for c in ens_frame.columns if c.startswith("member.")] == member_cols
    assert ((ens_frame["disagreement"] >= 0) & (ens_frame["disagreement"] <= 1)).all()


def test_nothing_readable_is_an_error_and_still_reported(trained, tmp_path):
    _, ckpt = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", str(ckpt), str(tmp_path / "empty"),
                                   str(tmp_path / "bad.png"), "--out", str(out),
                                   "--workers", "0"])
    assert res.exit_code == 1 and "no input could be predicted" in res.output
    skipped = pd.read_csv(out.with_name(f"{out.stem}.skipped.csv"))
    assert dict(zip(skipped["path"], skipped["reason"], strict=True)) == {
        str(tmp_path / "empty"): "empty folder",
        str(tmp_path / "bad.png"): "corrupt or truncated image (PNG header, undecodable data)",
    }


def test_unreadable_model_files_are_named_without_unsafe_advice(tmp_path):
    """A text file and a broken zip each get a message naming the file; torch's advice to
    retry with weights_only=False (arbitrary code execution) is not passed on."""
    from histoclass.models.ensemble import load_model_file

    (tmp_path / "notes.pt").write_text("not a model\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable model file \(not a "
                       r"PyTorch file, or one holding objects other than tensors") as err:
        load_model_file(tmp_path / "notes.pt")
    assert "weights_only" not in str(err.value)
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"broken\.pt: not a readable model file \("):
        load_model_file(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"model file .*absent\.pt does not exist"):
        load_model_file(tmp_path / "absent.pt")
