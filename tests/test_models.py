"""Members, weights loading (local file, errors) and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import (
    MEMBERS,
    WeightsError,
    create_model,
    load_checkpoint,
    member_meta,
    model_preprocess,
    read_checkpoint,
    save_checkpoint,
)
from histoclass.models.members import member_table
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

TINY = "test_efficientnet"


def test_member_table_lists_the_ten_members():
    rows = member_table()
    assert [r["name"] for r in rows] == list(MEMBERS)
    assert len(rows) == 10
    b0 = next(r for r in rows if r["name"] == "v1-b0")
    assert b0["input_size"] == 224 and b0["pretrained"] == "in1k"
    assert 3.9 < b0["params_M"] < 4.2  # EfficientNet-B0 with a 2-class head: ~4.0 M


def test_models_command_lists_ten_members():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    members_table = result.output.strip().split("\n\n")[0]  # then the foundation-model presets
    lines = members_table.splitlines()
    assert lines[0].split()[:3] == ["name", "timm", "params_M"]
    assert [line.split()[0] for line in lines[1:]] == list(MEMBERS)


def test_local_weights_load_into_backbone_and_leave_new_head(tmp_path):
    torch.manual_seed(1)
    source = create_model(TINY, 1000, pretrained=False)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model(TINY, 2, weights=path)
    src, dst = source.state_dict(), model.state_dict()
    body = [k for k in dst if not k.startswith("classifier")]
    assert all(torch.equal(src[k], dst[k]) for k in body)
    assert dst["classifier.weight"].shape == (2, src["classifier.weight"].shape[1])


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.pth does not exist"):
        create_model(TINY, 2, weights=tmp_path / "nope.pth")


def test_garbage_weights_file_is_an_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00\x01 this is not a checkpoint" * 50)
    with pytest.raises(WeightsError, match=r"garbage\.pth: cannot read weights"):
        create_model(TINY, 2, weights=path)


def test_weights_of_another_architecture_are_an_error(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet\.pth does not fit"):
        create_model(TINY, 2, weights=path)


def test_cli_train_with_bad_weights_exits_with_clear_error(tmp_path):
    manifest = synthetic_manifest(tmp_path, n_train=2, n_val=2, n_test=0)
    result = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"),
                                      "--model", TINY, "--weights", str(tmp_path / "no.pth")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no.pth does not exist" in result.output


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model(TINY, 2, pretrained=False).eval()
    pre = model_preprocess(model, 64)
    meta = member_meta(TINY, TINY, ["benign", "malignant"], pre, config={"lr": 1e-4},
                       history=[{"epoch": 1, "val_loss": 0.5}])
    path = save_checkpoint(tmp_path / "best.pt", model, meta)
    loaded, got = load_checkpoint(path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert got["preprocess"]["input_size"] == [64, 64]
    assert got["history"] == [{"epoch": 1, "val_loss": 0.5}]
    assert torch.load(path, weights_only=True)["meta"]["classes"] == ["benign", "malignant"]
    assert read_checkpoint(path)["meta"]["kind"] == "member"


def test_new_head_is_glorot_initialised():
    model = create_model(TINY, 2, pretrained=False)
    head = model.get_classifier()
    limit = (6 / (head.in_features + head.out_features)) ** 0.5
    assert head.weight.abs().max() <= limit and head.weight.abs().max() > limit / 2
    assert torch.count_nonzero(head.bias) == 0
