"""Ensembles: voting rules by hand, fitting on validation only, file round trip, member checks."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from helpers_predict import fixed_member, index_batch, sample_manifest, train_member
from histoclass.cli import app
from histoclass.data import read_manifest, select, write_manifest
from histoclass.models import CheckpointError
from histoclass.models.concat import ConcatHead
from histoclass.models.ensemble import Ensemble, disagreement, load_model_file
from histoclass.models.fit import fit_weights, inner_split
from histoclass.models.voting import HARD_EPS
from histoclass.predict import predict_manifest, predict_paths
from histoclass.train import fit_ensemble

torch.set_num_threads(1)

# p_malignant of three members on three images.
A, B, C = [0.9, 0.6, 0.2], [0.3, 0.2, 0.4], [0.8, 0.3, 0.1]


def _members(*ps):
    return [fixed_member(n, [[1 - v, v] for v in p]) for n, p in zip("abc", ps, strict=False)]


def _run(method, *ps, **kw):
    ens = Ensemble(_members(*ps), method, **kw)
    return ens.predict_proba([index_batch(len(ps[0]))] * len(ps))


def test_soft_vote_is_the_plain_mean():
    out = _run("soft", A, B, C)
    torch.testing.assert_close(out.proba[:, 1].float(),
                               torch.tensor([2.0 / 3, 1.1 / 3, 0.7 / 3]))
    assert out.pred.tolist() == [1, 0, 0]
    sd0 = float(np.std([0.9, 0.3, 0.8]))
    assert out.disagreement[0].item() == pytest.approx(sd0, abs=1e-6)


def test_weighted_vote_uses_the_weights():
    out = _run("weighted", A, B, C, weights=[0.5, 0.25, 0.25])
    torch.testing.assert_close(out.proba[:, 1].float(), torch.tensor([0.725, 0.425, 0.225]))
    assert out.pred.tolist() == [1, 0, 0]


def test_hard_vote_majority_and_vote_share():
    out = _run("hard", A, B, C)
    # votes for malignant: row0 a,c; row1 a; row2 none. The score is the vote share with the
    # soft average folded in at weight e: (votes + e * soft) / (3 + e).
    e = HARD_EPS
    soft = [(0.9 + 0.3 + 0.8) / 3, (0.6 + 0.2 + 0.3) / 3, (0.2 + 0.4 + 0.1) / 3]
    expected = [(v + e * s) / (3 + e) for v, s in zip([2, 1, 0], soft, strict=True)]
    torch.testing.assert_close(out.proba[:, 1].float(), torch.tensor(expected))
    torch.testing.assert_close(out.proba.sum(1).float(), torch.ones(3))
    assert out.pred.tolist() == [1, 0, 0]
    torch.testing.assert_close(out.disagreement.float(), torch.tensor([1 / 3, 1 / 3, 0.0]))


def test_hard_vote_tie_is_broken_by_the_soft_average():
    # Both rows are 1:1 ties; soft averages 0.6 (malignant) and 0.35 (benign).
    out = _run("hard", [0.9, 0.6], [0.3, 0.1])
    e = HARD_EPS
    torch.testing.assert_close(out.proba[:, 1].float(), torch.tensor([(1 + e * 0.6) / (2 + e),
                                                              (1 + e * 0.35) / (2 + e)]))
    assert out.pred.tolist() == [1, 0]
    assert ((out.proba[:, 1] >= 0.5).long() == out.pred).all()  # thresholding agrees with pred
    # Three classes, three members, three different votes: the best soft average wins.
    ms = [fixed_member(n, [p], classes=("x", "y", "z")) for n, p in
          (("a", [0.5, 0.3, 0.2]), ("b", [0.1, 0.6, 0.3]), ("c", [0.3, 0.3, 0.4]))]
    out3 = Ensemble(ms, "hard").predict_proba([index_batch(1)] * 3)
    # soft: x 0.3, y 0.4, z 0.3 -> y
    assert out3.pred.tolist() == [1]
    e = HARD_EPS
    torch.testing.assert_close(out3.proba.float(), torch.tensor([[(1 + e * 0.3) / (3 + e),
                                                          (1 + e * 0.4) / (3 + e),
                                                          (1 + e * 0.3) / (3 + e)]]))


def test_stack_applies_the_stored_logistic_regression():
    out = _run("stack", A, B, C, stack={"coef": [[1.0, 2.0, -1.0]], "intercept": [-0.5]})
    z = [0.9 + 0.6 - 0.8 - 0.5, 0.6 + 0.4 - 0.3 - 0.5, 0.2 + 0.8 - 0.1 - 0.5]
    expected = torch.tensor([1 / (1 + math.exp(-v)) for v in z])
    torch.testing.assert_close(out.proba[:, 1].float(), expected)


def test_multiclass_disagreement_is_mean_total_variation():
    members = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert disagreement("soft", members, torch.tensor([0])).item() == pytest.approx(0.5)
    same = torch.tensor([[[0.2, 0.3, 0.5]], [[0.2, 0.3, 0.5]]])
    assert disagreement("soft", same, torch.tensor([2])).item() == pytest.approx(0.0)


def test_weights_favour_the_better_member():
    y = torch.tensor([1, 0, 1, 0, 1, 1])
    good = torch.tensor([[0.1, 0.9] if t else [0.9, 0.1] for t in y.tolist()])
    coin = torch.full((6, 2), 0.5)
    w = fit_weights(torch.stack([coin, good]), y)
    assert sum(w) == pytest.approx(1.0) and min(w) >= 0 and w[1] > 0.95


def test_inner_split_is_patient_grouped_and_seeded():
    groups = [f"p{i // 3}" for i in range(24)]
    targets = [(i // 3) % 2 for i in range(24)]
    fit, stop, how = inner_split(groups, targets, 0.3, seed=1)
    assert how == "patient" and sorted(fit + stop) == list(range(24))
    assert not {groups[i] for i in fit} & {groups[i] for i in stop}
    assert {targets[i] for i in stop} == {0, 1}
    assert inner_split(groups, targets, 0.3, seed=1) == (fit, stop, how)


def test_concat_head_is_the_studys_architecture():
    head = ConcatHead(40, 2)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout",
                     "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [128, 32, 2]
    assert {m.p for m in head if isinstance(m, torch.nn.Dropout)} == {0.2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two trained members and a manifest whose train and test images are unreadable."""
    root = tmp_path_factory.mktemp("ens")
    manifest = sample_manifest(root / "orig")
    members = [train_member(manifest, root / "runs" / f"r{s}" / "best.pt", seed=s, steps=3 + s)
               for s in range(2)]
    frame = read_manifest(manifest)
    images = root / "images"
    images.mkdir()
    paths = []
    for path, split in zip(frame["path"], frame["split"], strict=True):
        dst = images / path.rsplit("/", 1)[-1]
        if split != "val":
            dst.write_bytes(b"only validation images may be read while fitting")
        else:
            shutil.copy(path, dst)
        paths.append(str(dst))
    blind = write_manifest(frame.assign(path=paths), root / "blind.csv")
    return manifest, blind, members, root


@pytest.mark.parametrize("method", ["weighted", "stack", "concat"])
def test_fitting_reads_validation_rows_only(setup, method):
    _, blind, members, _ = setup
    ens = fit_ensemble(members, method, blind, seed=0)
    val = select(read_manifest(blind), "val")
    assert sorted(ens.fit["paths"]) == sorted(val["path"])
    assert ens.fit["skipped"] == 0  # the unreadable train/test images were never opened
    assert ens.fit["fit_rows"] + ens.fit["stop_rows"] == len(val)


@pytest.mark.parametrize("method", ["soft", "weighted", "hard", "stack", "concat"])
def test_ensemble_file_round_trip(setup, method, tmp_path):
    manifest, _, members, _ = setup
    ens = fit_ensemble(members, method, manifest, refer_threshold=0.01)
    path = ens.save(tmp_path / f"{method}.pt")
    back = load_model_file(path)
    assert (back.method, back.classes, back.refer_threshold) == (method, ens.classes, 0.01)
    before = predict_manifest(ens, manifest, "test").frame
    after = predict_manifest(back, manifest, "test").frame
    pd.testing.assert_frame_equal(before, after)
    names = [m.name for m in ens.members]
    assert names == ["test_efficientnet@r0", "test_efficientnet@r1"]
    # the ensemble's own temperature travels with the file; raw.p_ is before it
    assert (back.temperature, back.calibration) == (ens.temperature, ens.calibration)
    assert ("raw.p_malignant" in after.columns) == (ens.temperature != 1.0)
    kept = [c for c in after.columns if not c.startswith("raw.")]
    assert kept[-7:] == ["pred", "confidence",
                                        *(f"member.{n}.p_malignant" for n in names),
                                        "disagreement", "refer", "refer_reason"]
    assert after["refer"].tolist() == (after["disagreement"] > 0.01).astype(int).tolist()
    assert set(after.loc[after["refer"] == 1, "refer_reason"]) <= {"members disagree"}
    assert set(after.loc[after["refer"] == 0, "refer_reason"]) <= {""}
    low = predict_paths(back, list(after["path"]), refer_threshold=1.0).frame
    assert low["refer"].sum() == 0


def test_changed_or_missing_member_is_an_error_naming_it(setup, tmp_path):
    _, _, members, _ = setup
    local = [shutil.copy(m, tmp_path / f"m{i}.pt") for i, m in enumerate(members)]
    path = fit_ensemble(local, "soft").save(tmp_path / "ens.pt")
    with open(local[1], "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match=r"m1\.pt has changed since the ensemble"):
        load_model_file(path)
    (tmp_path / "m1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"member .* file m1\.pt is missing"):
        load_model_file(path)


def test_members_are_found_relative_to_a_moved_ensemble(setup, tmp_path):
    _, _, members, _ = setup
    a = tmp_path / "a"
    a.mkdir()
    local = [shutil.copy(m, a / f"m{i}.pt") for i, m in enumerate(members)]
    fit_ensemble(local, "soft").save(a / "ens.pt")
    shutil.move(a, tmp_path / "b")
    assert len(load_model_file(tmp_path / "b" / "ens.pt").members) == 2


def test_cli_ensemble_then_predict(setup, tmp_path):
    manifest, _, members, _ = setup
    runner = CliRunner()
    out = tmp_path / "ens.pt"
    res = runner.invoke(app, ["ensemble", *map(str, members), "--method", "stack",
                              "--manifest", str(manifest), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "fitted on" in res.output and "validation" in res.output
    res = runner.invoke(app, ["predict", str(out), "--manifest", str(manifest), "--out",
                              str(tmp_path / "p.csv"), "--workers", "0", "--refer-threshold", "0"])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(tmp_path / "p.csv")
    assert {"disagreement", "refer"} <= set(frame.columns)
    bad = runner.invoke(app, ["ensemble", *map(str, members), "--method", "median",
                              "--out", str(out)])
    assert bad.exit_code == 2 and "unknown ensemble method 'median'" in bad.output


def test_preset_names_missing_member_files(setup, tmp_path):
    res = CliRunner().invoke(app, ["ensemble", "--preset", "v1", "--runs", str(tmp_path),
                                   "--method", "soft", "--out", str(tmp_path / "e.pt")])
    assert res.exit_code == 2
    assert "v1-b0/best.pt" in res.output and "v1-b4/best.pt" in res.output
