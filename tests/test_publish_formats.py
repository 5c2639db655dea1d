"""A published folder outside histoclass: timm alone rebuilds a member's exact logits, WSInfer's
config passes WSInfer's JSON schema and its TorchScript model gives histoclass's
probabilities, the CLI publishes and loads by name, and a failed push is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers_predict import make_member, sample_manifest, train_member
from histoclass import stain
from histoclass.cli import app
from histoclass.data.manifest import sample_path
from histoclass.data.transforms import Preprocess
from histoclass.deploy.publish import publish
from histoclass.models import load_model_file
from histoclass.train import fit_ensemble

torch.set_num_threads(1)
runner = CliRunner()
IMAGES = sorted(sample_path("breakhis").glob("*.png"))[:3]
TIMM_ONLY = """
import json, sys
import numpy as np, timm, torch
from PIL import Image
folder, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)  # the same kernels as the test process: bit-identical sums
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sys.argv[3:]])
with torch.no_grad():
    np.save(out, model(x).numpy())
assert not any(m.startswith("histoclass") for m in sys.modules), "histoclass was imported"
"""


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    manifest = sample_manifest(root)
    return manifest, [train_member(manifest, root / f"r{s}" / "best.pt", seed=s) for s in (0, 1)]


def _histoclass_logits(member, paths) -> np.ndarray:
    x = torch.stack([member.preparation(Image.open(p).convert("RGB"))[0] for p in paths])
    with torch.no_grad():
        return member.members[0].model(x).numpy()


def test_timm_alone_reproduces_the_members_logits_exactly(members, tmp_path):
    member = make_member(tmp_path / "m.pt", size=72, seed=3)  # not timm's default 224 px
    publish(member, tmp_path / "pub")
    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no histoclass on the path
    subprocess.run([sys.executable, str(script), str(tmp_path / "pub"), str(tmp_path / "l.npy"),
                    *map(str, IMAGES)], check=True, env={**env, "HF_HUB_OFFLINE": "1"},
                   cwd=tmp_path)
    got = np.load(tmp_path / "l.npy")
    np.testing.assert_array_equal(got, _histoclass_logits(load_model_file(member), IMAGES))


@pytest.mark.parametrize(("size", "interpolation"), [((64, 48), "bilinear"), ((72, 72), "bicubic")])
def test_timm_transform_from_the_config_equals_histoclass_preprocessing(size, interpolation):
    import timm

    from histoclass.deploy.publish import data_config

    pre = Preprocess(size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation)
    cfg = timm.data.resolve_data_config(args=data_config(pre), use_test_size=False)
    transform = timm.data.create_transform(**cfg)
    for p in IMAGES:
        img = Image.open(p).convert("RGB")
        assert torch.equal(transform(img), pre.normalize(pre.resize(img)))


def _wsinfer_transform(config: dict):
    """WSInfer 0.6's own construction (wsinfer.modellib.transforms): torchvision classes called
    with each item's ``arguments``."""
    from torchvision import transforms

    names = {"Resize": transforms.Resize, "ToTensor": transforms.ToTensor,
             "Normalize": transforms.Normalize}
    return transforms.Compose([names[t["name"]](**t.get("arguments", {}))
                               for t in config["transform"]])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("method", ["single", "stack"])
def test_wsinfer_format_passes_its_schema_and_gives_the_same_probabilities(members, method,
                                                                          tmp_path):
    client = pytest.importorskip("wsinfer_zoo.client", reason="wsinfer-zoo (dev extra) carries "
                                 "WSInfer's config JSON schema")
    manifest, paths = members
    model = paths[0] if method == "single" else \
        fit_ensemble(paths, method, manifest).save(tmp_path / "e.pt")
    publish(model, tmp_path / "pub", fmt="wsinfer", mpp=0.5)
    config = json.loads((tmp_path / "pub" / "wsinfer" / "config.json").read_text())
    parsed = client.ModelConfiguration.from_dict(config)  # jsonschema validation inside
    assert (parsed.patch_size_pixels, parsed.spacing_um_px) == (64, 0.5)
    assert parsed.class_names == ["benign", "malignant"]
    scripted = torch.jit.load(str(tmp_path / "pub" / "wsinfer" / "torchscript_model.pt"))
    transform = _wsinfer_transform(config)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in IMAGES])
    with torch.no_grad():
        probs = scripted(x).softmax(1).numpy()  # what WSInfer does with the output
    ref = load_model_file(f"local-dir:{tmp_path / 'pub'}").predict_images(
        [Image.open(p).convert("RGB") for p in IMAGES]).proba
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_wsinfer_needs_a_resolution_and_refuses_stain(members, tmp_path):
    _, paths = members
    with pytest.raises(ValueError, match=r"squashed to its input size.*give --mpp"):
        publish(paths[0], tmp_path / "a", fmt="wsinfer")
    assert not (tmp_path / "a").exists()  # nothing half-written
    ckpt = torch.load(paths[0], weights_only=True)
    ckpt["meta"]["stain"] = stain.fit("reinhard", np.asarray(Image.open(IMAGES[0]).convert(
        "RGB"))).to_dict()
    torch.save(ckpt, tmp_path / "stained.pt")
    with pytest.raises(ValueError, match=r"use stain normalisation, which WSInfer"):
        publish(tmp_path / "stained.pt", tmp_path / "b", fmt="wsinfer", mpp=0.5)
    with pytest.raises(ValueError, match=r"unknown --format 'qupath'; choose wsinfer"):
        publish(paths[0], tmp_path / "c", fmt="qupath")


def test_cli_publish_then_predict_explain_export_by_name(members, tmp_path):
    _, paths = members
    res = runner.invoke(app, ["publish", str(paths[0]), "--out", str(tmp_path / "pub")])
    assert res.exit_code == 0, res.output
    assert f"  {tmp_path / 'pub' / 'model.safetensors'}\n" in res.output  # every file written
    name = f"local-dir:{tmp_path / 'pub'}"
    res = runner.invoke(app, ["predict", name, *map(str, IMAGES), "--out", str(tmp_path / "p.csv"),
                              "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["explain", name, str(IMAGES[0]), "--out", str(tmp_path / "cams")])
    assert res.exit_code == 0, res.output
    pytest.importorskip("onnxruntime")
    res = runner.invoke(app, ["export", name, "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "max |p_onnx - p_torch|" in res.output
    res = runner.invoke(app, ["predict", "local-dir:" + str(tmp_path / "none"), str(IMAGES[0]),
                              "--out", str(tmp_path / "q.csv")])
    assert res.exit_code == 2 and "no such folder" in res.output


def test_push_failure_is_one_line_and_keeps_the_folder(members, tmp_path):
    _, paths = members
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_dummy",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "histoclass", "publish", str(paths[0]), "--out",
                          str(tmp_path / "pub"), "--push", "someone/model"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: push of {tmp_path / 'pub'} to hf-hub:someone/model failed ("), res.stderr
    assert "Traceback" not in res.stderr
    assert (tmp_path / "pub" / "model.safetensors").is_file()
    assert f"  {tmp_path / 'pub' / 'README.md'}\n" in res.stdout
