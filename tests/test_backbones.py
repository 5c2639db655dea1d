"""Any backbone: extra constructor arguments on `train`, hub and local-dir sources, presets."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histoclass.cli import app
from histoclass.models import load_checkpoint, read_checkpoint
from train_helpers import one_thread, synthetic_manifest  # noqa: F401 (autouse fixture)

RUN = ["--no-pretrained", "--epochs", "1", "--batch-size", "8", "--image-size", "64",
       "--workers", "0", "--device", "cpu", "--cache-dir", "off"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_manifest(tmp_path_factory.mktemp("bb"), n_train=8, n_val=4, n_test=2)


def test_model_arg_is_stored_and_rebuilt_by_predict(manifest, tmp_path):
    # test_vit is built for 160 px: at 64 px only dynamic_img_size=true lets it run, so a
    # rebuild that dropped the stored argument would fail in predict.
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                                   "test_vit", "--model-arg", "dynamic_img_size=true", *RUN])
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(out / "best.pt")["meta"]
    assert meta["model_args"] == {"dynamic_img_size": True}
    assert meta["config"]["model_args"] == {"dynamic_img_size": True}
    model, _ = load_checkpoint(out / "best.pt")
    assert model.dynamic_img_size
    images = pd.read_csv(manifest)["path"].tolist()[:2]
    res = CliRunner().invoke(app, ["predict", str(out / "best.pt"), *images, "--out",
                                   str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    probs = pd.read_csv(tmp_path / "p.csv")
    assert len(probs) == 2


def test_bad_model_arg_is_one_line(manifest, tmp_path):
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"),
                                   "--model", "test_vit", "--model-arg", "act_layer=Evil", *RUN])
    assert res.exit_code == 2
    assert "act_layer='Evil' is not an allowed class" in res.output
    assert "Traceback" not in res.output


def test_no_model_args_keeps_an_empty_record(manifest, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                                   "test_efficientnet", *RUN])
    assert res.exit_code == 0, res.output
    assert read_checkpoint(out / "best.pt")["meta"]["model_args"] == {}
    x = torch.randn(1, 3, 64, 64)
    assert load_checkpoint(out / "best.pt")[0](x).shape == (1, 2)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A test_vit with 2 register tokens and dynamic size, saved as timm's save_for_hf does."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False, reg_tokens=2, dynamic_img_size=True)
    save_for_hf(model, str(tmp_path / "vit"), safe_serialization=True)
    return tmp_path / "vit"


def test_local_dir_loads_weights_and_the_member_rebuilds_without_it(manifest, folder, tmp_path):
    import shutil

    import timm

    from histoclass.models import create_model

    saved = timm.create_model(f"local-dir:{folder}", pretrained=True).state_dict()
    model = create_model(f"local-dir:{folder}", 2)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head")}
    assert body and all(torch.equal(v, saved[k]) for k, v in body.items())
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(out), "--model",
                                   f"local-dir:{folder}", *[a for a in RUN if a !=
                                                            "--no-pretrained"]])
    assert res.exit_code == 0, res.output
    meta = read_checkpoint(out / "best.pt")["meta"]
    assert meta["timm_name"] == "test_vit" and meta["source"] == f"local-dir:{folder}"
    assert meta["model_args"]["reg_tokens"] == 2 and meta["model_args"]["dynamic_img_size"]
    assert "num_classes" not in meta["model_args"]
    shutil.rmtree(folder)  # the rebuild needs neither the folder nor the network
    loaded, _ = load_checkpoint(out / "best.pt")
    assert loaded.num_prefix_tokens == 3
    assert torch.isfinite(loaded(torch.randn(1, 3, 64, 64))).all()


def test_local_dir_without_config_is_one_line(tmp_path):
    from histoclass.models.sources import resolve_backbone

    with pytest.raises(ValueError, match=r"no config\.json in"):
        resolve_backbone(f"local-dir:{tmp_path}")


def _http(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/o/m"))


@pytest.mark.parametrize("make, match", [
    (lambda e: e.GatedRepoError("403 gated", response=_http(403)), "access refused by the "
     "Hugging Face Hub \\(gated model\\): accept its licence at https://huggingface.co/org/"
     "model and run `huggingface-cli login` or set HF_TOKEN; or pass --weights FILE"),
    (lambda e: e.HfHubHTTPError("401", response=_http(401)), "access refused"),
    (lambda e: e.RepositoryNotFoundError("404", response=_http(404)), "no such model"),
    (lambda e: e.LocalEntryNotFoundError("offline"), "not in the local Hugging Face cache"),
])
def test_refused_hub_downloads_are_one_line(monkeypatch, manifest, tmp_path, make, match):
    import huggingface_hub.errors as errors
    import timm.models._hub as hub

    def refuse(*a, **k):
        raise make(errors)

    monkeypatch.setattr(hub, "load_model_config_from_hf", refuse)
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "r"),
                                   "--model", "hf-hub:org/model", *RUN])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip().replace("\n", " ")
    assert re.search(match, " ".join(line.split())), res.output


def test_presets_resolve_to_hub_and_arguments(monkeypatch):
    import timm.models._hub as hub

    from histoclass.models.sources import resolve_backbone

    uni = resolve_backbone("uni", offline=True)  # architecture known: no config.json needed
    assert (uni.timm_name, uni.source) == ("vit_large_patch16_224", "hf-hub:MahmoodLab/UNI")
    assert uni.model_args == {"init_values": 1e-5, "dynamic_img_size": True}
    asked = []

    def config(ref, **k):
        asked.append(ref)
        return {}, "test_vit", {"reg_tokens": 4, "global_pool": "", "num_classes": 0}

    monkeypatch.setattr(hub, "load_model_config_from_hf", config)
    v2 = resolve_backbone("virchow2", {"dynamic_img_size": True})
    assert asked == ["paige-ai/Virchow2"] and v2.embedding == "cls+mean_patch"
    assert v2.model_args == {"reg_tokens": 4, "global_pool": "token", "mlp_layer": "SwiGLUPacked",
                             "act_layer": "SiLU", "dynamic_img_size": True}
    with pytest.raises(ValueError, match="published for transformers, not timm"):
        resolve_backbone("midnight")


def test_embedding_rules_by_hand():
    import timm

    from histoclass.models.presets import embed

    model = timm.create_model("test_vit", pretrained=False, reg_tokens=2).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = model.forward_features(x)  # 1 class + 2 register + 100 patch tokens
        assert tokens.shape[1] == 103
        both = embed(model, x, "cls+mean_patch")
        assert torch.allclose(both, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], -1))
        assert torch.allclose(embed(model, x, "cls"), tokens[:, 0])
    with pytest.raises(ValueError, match="unknown embedding rule 'gem'; use one of cls"):
        embed(model, x, "gem")


def test_models_lists_presets_beside_members():
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("v2-s", "uni", "uni2-h", "virchow2", "h-optimus-0", "h0-mini", "midnight"):
        assert any(line.split()[:1] == [name] for line in res.output.splitlines()), name
