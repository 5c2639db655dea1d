"""Published folders: every kind round-trips through ``local-dir:``, moved folders load, tampered
files are refused, ``hf-hub:`` names resolve, and the card carries ``evaluate``'s numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, metadata_load

import histoclass
from helpers_predict import sample_manifest, train_member
from histoclass.data import make_split, read_manifest, scan, write_manifest
from histoclass.data.images import load_rgb
from histoclass.data.manifest import sample_path
from histoclass.deploy.publish import publish
from histoclass.evaluate import evaluate_files, write_outputs
from histoclass.models import CheckpointError, load_model_file, save_checkpoint
from histoclass.predict import predict_manifest, write_predictions
from histoclass.train import fit_ensemble

torch.set_num_threads(1)
METHODS = ["soft", "weighted", "hard", "stack", "concat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two trained members whose checkpoints name their training manifest, and images."""
    root = tmp_path_factory.mktemp("pub")
    manifest = sample_manifest(root)
    members = []
    for s in range(2):
        path = train_member(manifest, root / "runs" / f"r{s}" / "best.pt", seed=s, steps=3 + s)
        ckpt = torch.load(path, weights_only=True)
        ckpt["meta"]["config"] = {"manifest": str(manifest), "out": str(path.parent),
                                  "fold": None, "epochs": 1}
        torch.save(ckpt, path)
        members.append(path)
    images = [load_rgb(p) for p in sorted(sample_path("breakhis").glob("*.png"))[:4]]
    return root, manifest, members, images


def _same(a, b, images, tol=1e-6):
    sa, sb = a.predict_images(images), b.predict_images(images)
    for x, y in zip(sa, sb, strict=True):
        assert np.abs(np.asarray(x, float) - np.asarray(y, float)).max() <= tol


def _text_files(folder: Path) -> str:
    return "\n".join(p.read_text() for p in folder.rglob("*") if p.suffix in (".json", ".md"))


def test_member_round_trip_and_folder_contents(setup, tmp_path):
    root, manifest, members, images = setup
    files = publish(members[0], tmp_path / "m")
    names = sorted(p.name for p in files)
    assert names == ["README.md", "config.json", "histoclass.json", "model.safetensors"]
    back = histoclass.load(f"local-dir:{tmp_path / 'm'}")
    assert back.classes == ["benign", "malignant"] and not back.is_ensemble
    _same(load_model_file(members[0]), back.classifier, images)
    meta = json.loads((tmp_path / "m" / "histoclass.json").read_text())
    assert meta["split"]["protocol"] == "patient" and meta["split"]["leaks_patients"] is False
    assert meta["split"]["manifest_sha256"] == __import__("hashlib").sha256(
        manifest.read_bytes()).hexdigest()
    assert (meta["input_mode"], meta["temperature"], meta["train_mpp"]) == ("resize", 1.0, None)
    assert meta["metrics"]["source"] == "validation"
    assert str(root) not in _text_files(tmp_path / "m")  # no absolute path of this machine
    assert meta["member"]["config"]["manifest"] == "manifest.csv"


def test_a_vit_member_round_trips(setup, tmp_path):
    from histoclass.models import create_model, member_meta, model_preprocess

    torch.manual_seed(0)
    model = create_model("test_vit", 2, pretrained=False)
    meta = member_meta("test_vit", "test_vit", ["benign", "malignant"], model_preprocess(model))
    path = save_checkpoint(tmp_path / "vit.pt", model, meta)
    publish(path, tmp_path / "vit")
    _same(load_model_file(path), load_model_file(f"local-dir:{tmp_path / 'vit'}"), setup[3])


def test_best_pt_publishes_without_loss_and_last_pt_drops_training_state(setup, tmp_path):
    _, _, members, _ = setup
    ckpt = torch.load(members[0], weights_only=True)
    publish(members[0], tmp_path / "best")
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "best" / "model.safetensors")
    assert weights.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(weights[k], v) for k, v in ckpt["state_dict"].items())
    model = load_model_file(members[0]).members[0].model
    last = save_checkpoint(tmp_path / "last.pt", model, {
        **ckpt["meta"], "train_state": {"epoch": 3, "rng": torch.ones(3, dtype=torch.uint8)}})
    publish(last, tmp_path / "last")
    meta = json.loads((tmp_path / "last" / "histoclass.json").read_text())["member"]
    assert "train_state" not in meta and meta["metrics"] == ckpt["meta"]["metrics"]
    assert "train_state" in torch.load(last, weights_only=True)["meta"]  # last.pt unchanged


@pytest.mark.parametrize("method", METHODS)
def test_every_ensemble_kind_round_trips(setup, method, tmp_path):
    _, manifest, members, images = setup
    ens = fit_ensemble(members, method, manifest, refer_threshold=0.02)
    path = ens.save(tmp_path / f"{method}.pt")
    publish(path, tmp_path / "out")
    back = load_model_file(f"local-dir:{tmp_path / 'out'}")
    assert (back.method, back.refer_threshold, back.member_names) == (
        method, 0.02, ens.member_names)
    _same(ens, back, images)
    kinds = {p.suffix for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert kinds == {".json", ".safetensors", ".md"}  # nothing pickled
    assert (tmp_path / "out" / "members" / "test_efficientnet@r0" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "head.safetensors").is_file() == (method == "concat")
    assert str(tmp_path) not in _text_files(tmp_path / "out")


def test_moved_folder_still_loads(setup, tmp_path):
    _, manifest, members, images = setup
    ens = fit_ensemble(members, "stack", manifest)
    publish(ens.save(tmp_path / "e.pt"), tmp_path / "a" / "pub")
    shutil.move(tmp_path / "a", tmp_path / "b")
    (tmp_path / "e.pt").unlink()
    for m in members:  # the published folder needs none of the original files
        shutil.move(m, m.with_suffix(".away"))
    try:
        _same(ens, load_model_file(tmp_path / "b" / "pub"), images)
    finally:
        for m in members:
            shutil.move(m.with_suffix(".away"), m)


@pytest.fixture
def published(setup, tmp_path):
    _, manifest, members, _ = setup
    ens = fit_ensemble(members, "concat", manifest)
    publish(ens.save(tmp_path / "e.pt"), tmp_path / "ens")
    publish(members[0], tmp_path / "one")
    return tmp_path / "ens", tmp_path / "one"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("file", "message"), [
    ("one/model.safetensors", r"one/model\.safetensors has changed since the model was published"),
    ("one/config.json", r"one/config\.json has changed since the model was published"),
    ("ens/head.safetensors", r"ens/head\.safetensors has changed"),
    ("ens/members/test_efficientnet@r1/model.safetensors", r"r1/model\.safetensors has changed"),
    ("ens/members/test_efficientnet@r0/histoclass.json", r"r0/histoclass\.json (has changed|: "
     r"not a readable JSON)"),
])
def test_tampered_files_are_refused(published, file, message):
    _flip(published[0].parent / file)
    with pytest.raises(CheckpointError, match=message):
        load_model_file(published[0].parent / file.split("/")[0])


def _edit(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_malformed_json_is_refused_naming_the_file(published):
    ens, one = published
    _edit(one / "histoclass.json", lambda o: o.pop("classes"))
    with pytest.raises(CheckpointError, match=r"one/histoclass\.json: key 'classes' is missing"):
        load_model_file(f"local-dir:{one}")
    _edit(ens / "histoclass.json", lambda o: o["members"][0].update(path="../../one"))
    with pytest.raises(CheckpointError, match=r"'\.\./\.\./one' points outside the model folder"):
        load_model_file(ens)
    (ens / "histoclass.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ens/histoclass\.json: not a readable JSON file"):
        load_model_file(ens)


def test_unbuildable_architecture_is_one_line(published):
    from histoclass.models.checkpoint import file_sha256

    one = published[1]
    _edit(one / "config.json", lambda o: o.update(architecture="no_such_net"))
    _edit(one / "histoclass.json", lambda o: (o["member"].update(timm_name="no_such_net"),
                                              o["files"].update({"config.json": file_sha256(
                                                  one / "config.json")})))
    with pytest.raises(CheckpointError, match=r"histoclass\.json: cannot build 'no_such_net'"):
        load_model_file(one)


def test_config_that_disagrees_with_histoclass_json_is_refused(published):
    from histoclass.models.checkpoint import file_sha256

    one = published[1]
    _edit(one / "config.json", lambda o: o.update(label_names=["a", "b"]))
    _edit(one / "histoclass.json",  # a consistent-looking hash: the schema check still applies
          lambda o: o["files"].update({"config.json": file_sha256(one / "config.json")}))
    with pytest.raises(CheckpointError, match=r"config\.json: label_names disagree"):
        load_model_file(one)


def test_not_a_published_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a published histoclass model \(no histoclass"):
        load_model_file(f"local-dir:{tmp_path}")
    with pytest.raises(CheckpointError, match=r"local-dir:.*nope: no such folder"):
        load_model_file(f"local-dir:{tmp_path / 'nope'}")
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match=r"already exists and is not an empty folder"):
        publish(tmp_path / "x", tmp_path)


def test_hf_hub_names_resolve_through_snapshot_download(published, monkeypatch, setup):
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None):
        calls.append((repo_id, revision))
        return str(published[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model = histoclass.load("hf-hub:someone/breast-b0@v1")
    assert calls == [("someone/breast-b0", "v1")]
    _same(load_model_file(setup[2][0]), model.classifier, setup[3])

    def offline(repo_id, revision=None):
        raise OSError("We couldn't connect to the hub\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"^hf-hub:a/b: download failed \(OSError: We "
                       r"couldn't connect to the hub\)$"):
        load_model_file("hf-hub:a/b")
    with pytest.raises(CheckpointError, match=r"hf-hub:nope: not a hub name"):
        load_model_file("hf-hub:nope")


def _evaluate(clf, manifest: Path, out: Path) -> Path:
    csv, _ = write_predictions(predict_manifest(clf, manifest, "test"), out / "preds.csv")
    write_outputs(evaluate_files([csv], bootstrap=50), out / "eval")
    return out / "eval" / "metrics.json"


def test_card_parses_and_carries_evaluates_patient_numbers(setup, tmp_path):
    _, manifest, members, _ = setup
    ens = fit_ensemble(members, "soft", manifest)
    metrics = _evaluate(ens, manifest, tmp_path)
    publish(ens.save(tmp_path / "e.pt"), tmp_path / "card", metrics=metrics, repo_id="org/b0")
    card = ModelCard.load(tmp_path / "card" / "README.md")
    values = json.loads(metrics.read_text())
    results = {r.metric_type: r for r in card.data.eval_results}
    pa = results["patient_accuracy"]
    assert pa.metric_value == values["patient_accuracy"] and pa.metric_args["level"] == "patient"
    assert pa.dataset_args["protocol"] == "patient" and pa.dataset_split == "test"
    run = json.loads((metrics.parent / "evaluation.json").read_text())
    if values["ci95"].get("patient_accuracy"):
        assert [pa.metric_args["ci95_low"], pa.metric_args["ci95_high"]] == \
            values["ci95"]["patient_accuracy"]
    else:  # too few test patients: the card states evaluate's refusal, never an interval
        assert "ci95_low" not in pa.metric_args and run["ci_note"].startswith("n/a")
        assert f"95% intervals: {run['ci_note']}" in card.text
    assert f"| patient_accuracy | patient | {values['patient_accuracy']:.4f} |" in card.text
    assert "Not a medical device and not for diagnosis" in card.text
    assert "Spanhol" in card.text and 'histoclass.load("hf-hub:org/b0")' in card.text
    assert "PATIENTS LEAK" not in card.text
    meta = metadata_load(tmp_path / "card" / "README.md")
    assert meta["license"] == "mit" and meta["model-index"][0]["name"] == "org/b0"


def test_paper_protocol_gets_a_loud_warning(setup, tmp_path):
    _, _, members, _ = setup
    paper = make_split(scan(sample_path("ucsb")).frame, "paper", val=0.3, test=0.3, seed=0)
    path = write_manifest(paper, tmp_path / "paper.csv")
    assert set(read_manifest(path)["protocol"]) == {"paper"}
    publish(members[0], tmp_path / "p", manifest=path)
    text = (tmp_path / "p" / "README.md").read_text()
    assert "**WARNING: PATIENTS LEAK.**" in text and "protocol-paper" in text
    assert json.loads((tmp_path / "p" / "histoclass.json").read_text())["split"][
        "leaks_patients"] is True
