"""The cases of ``benchmarks/bad_inputs.py``: each builds its files and says what must happen.

A case's ``build(folder, shared)`` returns a spec: ``args`` (the CLI arguments), ``expect``
(``ok``, ``skip`` or ``refused``), ``bad`` (names the answer must name), ``inputs`` (every
input name, for the silent-loss check), ``says`` (fragments the answer must contain), an
optional ``check(output, folder)`` returning why the answer is dishonest, and ``env``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from histoclass.data.manifest import sample_path
from honest_helpers import Evil, nan_onnx

UCSB = sample_path("ucsb")
BREAKHIS = sorted(sample_path("breakhis").glob("*.png"))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, dict], dict]


def build_shared(root: Path) -> dict:
    """A tiny trained-shape member, a manifest of the UCSB sample, a greyscale target."""
    import torch

    from histoclass.data import make_split, scan, write_manifest
    from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint

    root.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2, pretrained=False)
    meta = member_meta("test_efficientnet", "test_efficientnet", ["benign", "malignant"],
                       model_preprocess(model, 32))
    ckpt = save_checkpoint(root / "m.pt", model, meta)
    frame = make_split(scan(UCSB).frame, "patient", val=0.3, test=0.3, seed=0)
    manifest = write_manifest(frame, root / "manifest.csv")
    grey = np.asarray(Image.open(BREAKHIS[1]).convert("L").convert("RGB"))
    Image.fromarray(grey).save(root / "grey.png")
    return {"model": ckpt, "manifest": manifest, "grey": root / "grey.png", "root": root}


# -- builders ------------------------------------------------------------------------------------
def good(folder: Path, n: int = 2, label: str = "malignant") -> list[Path]:
    """``n`` real H&E images in a class folder (names that hold no patient)."""
    out = []
    for i, src in enumerate(sorted((UCSB / label).glob("*.jpg"))[:n]):
        dst = folder / label / f"good{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        out.append(dst)
    return out


def bomb_png(path: Path, side: int = 100_000) -> None:
    """A valid PNG header claiming ``side`` x ``side`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    path.write_bytes(data + struct.pack(">I", len(idat) - 4) + idat
                     + struct.pack(">I", zlib.crc32(idat)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def image_file(kind: str, path: Path) -> None:
    """One bad or unusual image file of ``kind``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(Image.open(sorted((UCSB / "benign").glob("*.jpg"))[0]).convert("RGB"))
    src = sorted((UCSB / "benign").glob("*.jpg"))[0]
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    elif kind == "truncated-png":
        Image.fromarray(rgb).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "truncated-jpeg":
        path.write_bytes(src.read_bytes()[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "html":
        path.write_text("<html><script>alert(1)</script></html>")
    elif kind == "bomb":
        bomb_png(path)
    elif kind == "16bit":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(path)
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG")
    elif kind == "1x1":
        Image.fromarray(rgb[:1, :1]).save(path)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path, transparency=0)
    elif kind == "animated":
        frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1])]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    elif kind == "float01":
        Image.fromarray(rgb[..., 1].astype(np.float32) / 255.0, mode="F").save(path)
    elif kind == "floatnan":
        Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(path)
    elif kind == "multipage":
        pages = [Image.fromarray(rgb), Image.fromarray(rgb)]
        pages[0].save(path, save_all=True, append_images=pages[1:])
    elif kind == "bmp":
        Image.fromarray(rgb).save(path, format="BMP")
    elif kind == "webp":
        Image.fromarray(rgb).save(path, format="WEBP", lossless=True)
    else:
        raise ValueError(kind)


BAD_IMAGES = {  # kind: (file name, expect)
    "corrupt": ("bad.png", "skip"), "truncated-png": ("cut.png", "skip"),
    "truncated-jpeg": ("cut.jpg", "skip"), "empty": ("empty.png", "skip"),
    "text": ("notes.png", "skip"), "html": ("page.jpg", "skip"), "bomb": ("bomb.png", "skip"),
    "animated": ("anim.png", "skip"), "floatnan": ("nan.tif", "skip"),
    "multipage": ("pages.tif", "skip"),
    "16bit": ("deep.png", "ok"), "rgba": ("alpha.png", "ok"), "cmyk": ("cmyk.jpg", "ok"),
    "1x1": ("dot.png", "ok"), "palette": ("pal.png", "ok"), "float01": ("float.tif", "ok"),
    "bmp": ("img.bmp", "ok"), "webp": ("img.webp", "ok"),
}


def image_case(kind: str, command: str) -> Case:
    name, expect = BAD_IMAGES[kind]

    def build(folder: Path, shared: dict) -> dict:
        data = folder / "data"
        goods = good(data) + good(data, 2, "benign")
        image_file(kind, data / "malignant" / name)
        inputs = [p.name for p in goods] + [name]
        if command == "split":
            args = ["split", str(data), "--out", str(folder / "out")]
        elif command == "predict":
            args = ["predict", str(shared["model"]), str(data), "--out",
                    str(folder / "out" / "p.csv"), "--workers", "0"]
        else:
            args = ["stain", str(data), "--method", "reinhard", "--target",
                    str(BREAKHIS[1]), "--out", str(folder / "out"), "--workers", "1"]
        return {"args": args, "expect": "ok", "inputs": inputs,
                "bad": [name] if expect == "skip" else []}

    return Case(f"{kind} image / {command}", build)


def refuses(name: str, make: Callable[[Path, dict], list[str]], *says: str,
            check: Callable | None = None, env: dict | None = None) -> Case:
    """A case whose command must exit non-zero saying ``says``."""
    def build(folder: Path, shared: dict) -> dict:
        return {"args": make(folder, shared), "expect": "refused", "says": list(says),
                "check": check, "env": env or {}}

    return Case(name, build)


def accepts(name: str, make: Callable[[Path, dict], list[str]], *says: str,
            check: Callable | None = None, inputs: Callable | None = None) -> Case:
    """A case whose command must succeed (and say ``says``)."""
    def build(folder: Path, shared: dict) -> dict:
        args = make(folder, shared)
        return {"args": args, "expect": "ok", "says": list(says), "check": check,
                "inputs": inputs(folder) if inputs else []}

    return Case(name, build)


# -- small helpers for the case list -------------------------------------------------------------
def _predict(folder: Path, shared: dict, *inputs: str, out: str = "out/p.csv") -> list[str]:
    return ["predict", str(shared["model"]), *inputs, "--out", str(folder / out), "--workers",
            "0"]


def _csv(folder: Path, rows: list[dict], name: str = "in.csv") -> Path:
    for row in rows:
        p = folder / row["path"]
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sorted(UCSB.rglob("*.jpg"))[len(row["path"]) % 20], p)
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def _manifest(folder: Path, shared: dict, edit: Callable[[pd.DataFrame], None],
              protocol: str = "patient") -> Path:
    from histoclass.data import make_split, scan, write_manifest

    frame = make_split(scan(UCSB).frame, protocol, folds=2)
    edit(frame)
    return write_manifest(frame, folder / "manifest.csv")


def _first(column: str, value: str) -> Callable[[pd.DataFrame], None]:
    """An edit of a manifest: the first row's ``column`` becomes ``value``."""
    def edit(frame: pd.DataFrame) -> None:
        frame.loc[0, column] = value

    return edit


def _preds(folder: Path, rows: list[tuple], **extra) -> Path:
    frame = pd.DataFrame(rows, columns=["path", "patient_id", "label", "p_malignant"])
    for k, v in extra.items():
        frame[k] = v
    frame.to_csv(folder / "p.csv", index=False)
    return folder / "p.csv"


def _no(text: str) -> Callable[[str, Path], str | None]:
    return lambda out, folder: f"said {text!r}" if text in out else None


def _json(file: str, key: str, want_none: bool) -> Callable[[str, Path], str | None]:
    def check(out: str, folder: Path) -> str | None:
        value = json.loads((folder / file).read_text())
        for k in key.split("."):
            value = value[k]
        if (value is None) != want_none:
            return f"{key} = {value!r}"
        return None

    return check


def _checkpoint(folder: Path, shared: dict, edit: Callable[[dict], None]) -> Path:
    import torch

    obj = torch.load(shared["model"], weights_only=True)
    edit(obj)
    torch.save(obj, folder / "bad.pt")
    return folder / "bad.pt"


def _nan_weights(obj: dict) -> None:
    obj["state_dict"]["classifier.weight"][0, 0] = float("nan")


def _evil(folder: Path, zip_format: bool = False) -> Path:
    path = folder / "evil.pt"
    if zip_format:
        import torch

        torch.save({"state_dict": Evil()}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": Evil()}, fh, protocol=2)
    return path


def _traversal_onnx(folder: Path) -> Path:
    """An ONNX file whose weights live 'outside' the model folder (../../../etc/passwd)."""
    import onnx
    from onnx import TensorProto, helper

    path = nan_onnx(folder / "trav.onnx")
    model = onnx.load(str(path))
    t = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../../../../../etc/passwd")
    model.graph.initializer.append(t)
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_out"]))
    model.graph.output.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [4]))
    onnx.save(model, str(path))
    return path


class NotHereError(Exception):
    """A case this machine cannot build (e.g. mounting needs root): reported, not run."""


def _mount(folder: Path, shared: dict, size: str, readonly: bool = False) -> Path:
    """A real tiny tmpfs at ``folder/mnt`` (full disk, read-only), unmounted when the run
    ends; root only (root ignores chmod, so only a real mount is a read-only test)."""
    mnt = folder / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                                            "tmpfs", str(mnt)], capture_output=True).returncode:
        raise NotHereError("mounting a tmpfs needs root")
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    shared.setdefault("cleanup", {})[str(mnt)] = lambda: subprocess.run(
        ["umount", "-l", str(mnt)], capture_output=True)
    return mnt


def _train(folder: Path, manifest: Path, *extra: str) -> list[str]:
    return ["train", str(manifest), "--out", str(folder / "run"), "--model",
            "test_efficientnet", "--no-pretrained", "--epochs", "1", "--image-size", "32",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", *extra]


def _trained(folder: Path, shared: dict) -> Path:
    """A finished one-epoch run in ``folder/run`` (trained by the real CLI)."""
    manifest = folder / "manifest.csv"
    shutil.copy(shared["manifest"], manifest)
    subprocess.run([sys.executable, "-m", "histoclass", *_train(folder, manifest)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(
                       Path(__file__).resolve().parents[1] / "src")})
    return manifest


def _run_config(folder: Path, **change) -> Path:
    import yaml

    cfg = {"data": "sample:ucsb", "out": str(folder / "run"), "members": ["test_efficientnet"],
           "split": {"protocol": "patient", "seed": 0, "val": 0.3, "test": 0.3},
           "train": {"epochs": 1, "batch_size": 8, "image_size": 32, "pretrained": False,
                     "workers": 0, "cache_dir": None}, "evaluate": {"bootstrap": 0}, **change}
    (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "c.yaml"


def _not_clean(out: str, folder: Path) -> str | None:
    return "called ungrouped data clean" if out.startswith("clean") or "\nclean:" in out \
        else None


def _gone(*names: str) -> Callable[[str, Path], str | None]:
    def check(out: str, folder: Path) -> str | None:
        left = [str(p) for n in names for p in folder.rglob(n)]
        return f"left {left}" if left else None

    return check


def _fs_case(name: str, setup: Callable[[Path], list[str]], command: str = "split") -> Case:
    """A folder with good images plus odd entries made by ``setup`` (returns their names)."""
    def build(folder: Path, shared: dict) -> dict:
        data = folder / "data"
        goods = good(data) + good(data, 2, "benign")
        bad = setup(data)
        args = (["split", str(data), "--out", str(folder / "out")] if command == "split"
                else _predict(folder, shared, str(data)))
        return {"args": args, "expect": "ok", "bad": bad, "inputs": [p.name for p in goods]}

    return Case(name, build)


def _symlinked_class(data: Path) -> list[str]:
    other = data.parent / "elsewhere"
    for i, src in enumerate(sorted((UCSB / "benign").glob("*.jpg"))[5:7]):
        other.mkdir(exist_ok=True)
        shutil.copy(src, other / f"linked{i}.jpg")
    (data / "fibroadenoma").symlink_to(other, target_is_directory=True)
    return []


def _loop(data: Path) -> list[str]:
    (data / "benign" / "loop").symlink_to(data, target_is_directory=True)
    return ["loop"]


def _dangling(data: Path) -> list[str]:
    (data / "benign" / "gone.png").symlink_to(data / "nothing.png")
    return ["gone.png"]


def _fifo(data: Path) -> list[str]:
    os.mkfifo(data / "benign" / "pipe.png")
    return ["pipe.png"]


def _dir_png(data: Path) -> list[str]:
    (data / "benign" / "folder.png").mkdir()
    return ["folder.png"]


def _gif(data: Path) -> list[str]:
    image_file("animated", data / "benign" / "anim.gif")
    return ["anim.gif"]


def _mystery(data: Path) -> list[str]:
    image_file("rgba", data / "misc" / "mystery.png")
    return ["mystery.png"]


def _ungrouped_split(folder: Path, shared: dict) -> list[str]:
    good(folder / "data", 3)
    good(folder / "data", 3, "benign")
    return ["split", str(folder / "data"), "--out", str(folder / "out")]


def _ungrouped_manifest(folder: Path, shared: dict) -> Path:
    from histoclass.data import make_split, scan, write_manifest

    good(folder / "data", 3)
    good(folder / "data", 3, "benign")
    return write_manifest(make_split(scan(folder / "data").frame, "patient", val=0.2, test=0.3),
                          folder / "manifest.csv")


def _crops(folder: Path, shared: dict) -> list[str]:
    src = sorted(UCSB.rglob("*.jpg"))
    names = ["SOB_B_A_14-22549AB_{}.png", "SOB_M_DC-14-2523-40-010_crop{}.png",
             "SOB_M_DC_14-12312_{}.png"]
    (folder / "data").mkdir()
    for i, pattern in enumerate(names):
        for k in range(4):
            Image.open(src[4 * i + k]).save(folder / "data" / pattern.format(k))
    return ["split", str(folder / "data"), "--out", str(folder / "out")]


def _patients_are(n: int) -> Callable[[str, Path], str | None]:
    def check(out: str, folder: Path) -> str | None:
        got = pd.read_csv(folder / "out" / "manifest.csv", dtype=str)["patient_id"].nunique()
        return None if got == n else f"{got} patients, not {n}"

    return check


def _resaved_leak(folder: Path, shared: dict) -> list[str]:
    from histoclass.data import make_split, scan, write_manifest

    data = folder / "data"
    good(data, 3, "benign")
    good(data, 3)
    Image.open(data / "benign" / "good0.jpg").save(data / "malignant" / "copy.png")
    frame = make_split(scan(data).frame, "patient", val=0.0, test=0.5)
    pair = frame["path"].str.contains("benign/good0.jpg|malignant/copy.png", regex=True)
    frame.loc[pair, "split"] = ["train", "test"]  # a hand-edited leak of one picture
    return ["audit", str(write_manifest(frame, folder / "m.csv")), "--allow-ungrouped"]


def _byte_dup(folder: Path, shared: dict) -> list[str]:
    data = folder / "data"
    good(data, 2, "benign")
    good(data, 2)
    shutil.copy(data / "benign" / "good0.jpg", data / "malignant" / "same.jpg")
    return ["split", str(data), "--out", str(folder / "out")]


def _evil_header(out: str, folder: Path) -> str | None:
    page = (folder / "e" / "report.html").read_text()
    return "raw HTML from the CSV header in the report" if "<img src=x" in page else None


def _nan_rows_have_no_class(out: str, folder: Path) -> str | None:
    frame = pd.read_csv(folder / "out" / "p.csv", keep_default_na=False)
    return "a NaN output got a class" if (frame["pred"] != "").any() else None


def _changed_member(folder: Path, shared: dict) -> list[str]:
    from histoclass.models.ensemble import Ensemble, load_member

    a, b = folder / "a.pt", folder / "b.pt"
    shutil.copy(shared["model"], a)
    shutil.copy(shared["model"], b)
    Ensemble([load_member(a, "a"), load_member(b, "b")], "soft",
             member_paths=[a, b]).save(folder / "ens.pt")
    b.write_bytes(b.read_bytes() + b"\x00")
    return ["predict", str(folder / "ens.pt"), str(BREAKHIS[0]), "--out", str(folder / "p.csv")]


def _two_runs(folder: Path, shared: dict) -> list[str]:
    (folder / "bad.png").write_text("x")
    first = _predict(folder, shared, str(BREAKHIS[0]), str(folder / "bad.png"), out="o/a.csv")
    subprocess.run([sys.executable, "-m", "histoclass", *first], capture_output=True, env={
        **os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    return _predict(folder, shared, str(BREAKHIS[1]), str(folder / "bad.png"), out="o/b.csv")


def _both_skip_lists(out: str, folder: Path) -> str | None:
    lists = sorted(p.name for p in (folder / "o").glob("*.skipped.csv"))
    return None if lists == ["a.skipped.csv", "b.skipped.csv"] else f"skip lists {lists}"


def _old_name(out: str, folder: Path) -> str | None:
    preds = pd.read_csv(folder / "o" / "skipped.csv")
    return None if "p_malignant" in preds.columns else "predictions overwritten by a skip list"


def _stale(folder: Path, shared: dict) -> list[str]:
    import time

    run = folder / "run"
    run.mkdir()
    for p in (run / ".best.pt.a1b2.tmp", run / ".last.pt.c3d4.tmp"):
        p.write_bytes(b"half a checkpoint")
        os.utime(p, (time.time() - 3600,) * 2)
    manifest = folder / "manifest.csv"
    shutil.copy(shared["manifest"], manifest)
    return _train(folder, manifest)


def _unreadable_after_split(folder: Path, shared: dict) -> list[str]:
    from histoclass.data import read_manifest, write_manifest

    frame = read_manifest(shared["manifest"])
    victim = folder / "victim.jpg"
    shutil.copy(frame.loc[frame["split"] == "train", "path"].iloc[0], victim)
    frame.loc[frame["path"] == frame.loc[frame["split"] == "train", "path"].iloc[0],
              "path"] = str(victim)
    manifest = write_manifest(frame, folder / "manifest.csv")
    victim.write_bytes(victim.read_bytes()[:200])  # broken after the split
    return _train(folder, manifest)


def _resume_select(folder: Path, shared: dict) -> list[str]:
    manifest = _trained(folder, shared)
    return _train(folder, manifest, "--resume", "--select", "auc")


def _resume_manifest(folder: Path, shared: dict) -> list[str]:
    manifest = _trained(folder, shared)
    frame = pd.read_csv(manifest)
    frame.iloc[::-1].to_csv(manifest, index=False)
    return _train(folder, manifest, "--resume")


def _other_settings(folder: Path, shared: dict) -> list[str]:
    subprocess.run([sys.executable, "-m", "histoclass", "run", str(_run_config(folder))],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(
                       Path(__file__).resolve().parents[1] / "src")})
    return ["run", str(_run_config(folder, train={"epochs": 2, "batch_size": 8,
                                                  "image_size": 32, "pretrained": False,
                                                  "workers": 0, "cache_dir": None}))]


EVIL = "<img src=x onerror=alert(1)>"
OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "",
           "HF_HUB_CACHE": "/nonexistent"}
ROWS = [("a.png", "", "benign", 0.2), ("b.png", "", "malignant", 0.8),
        ("c.png", "", "benign", 0.4), ("d.png", "", "malignant", 0.6)]
PATIENTS = [(p, pid, lab, v) for (p, _, lab, v), pid in zip(ROWS, "ABCD", strict=True)]

CASES: list[Case] = [
    # image files: named and skipped, or converted; nothing else lost
    *[image_case(k, "predict") for k in ("corrupt", "truncated-png", "text", "bomb", "16bit",
                                         "cmyk", "1x1", "float01", "floatnan", "multipage",
                                         "palette")],
    *[image_case(k, "split") for k in ("truncated-jpeg", "empty", "html", "bomb", "animated",
                                       "rgba", "16bit", "bmp", "webp", "multipage")],
    *[image_case(k, "stain") for k in ("corrupt", "1x1", "rgba")],
    # folders and odd entries
    _fs_case("symlinked class folder / split", _symlinked_class),
    _fs_case("symlink loop / split", _loop),
    _fs_case("dangling symlink / predict", _dangling, "predict"),
    _fs_case("FIFO named .png / split", _fifo),
    _fs_case("folder named x.png / predict", _dir_png, "predict"),
    _fs_case("animated GIF (.gif) / split", _gif),
    _fs_case("unknown name, no class folder / split", _mystery),
    refuses("empty folder / split", lambda f, s: ["split", str(f), "--out", str(f / "o")],
            "no images found"),
    refuses("empty folder / predict", lambda f, s: _predict(f, s, str(f)),
            "no input could be predicted"),
    accepts("missing input / predict",
            lambda f, s: _predict(f, s, str(BREAKHIS[0]), str(f / "missing.png")),
            "missing.png: no such file or folder"),
    refuses("missing data / split", lambda f, s: ["split", str(f / "nope"), "--out", str(f)],
            "no such file or folder"),
    # patients, duplicates, CSVs, split values
    accepts("no patient ids / split", _ungrouped_split, "WARNING: no patient ids for any of"),
    refuses("no patient ids / audit", lambda f, s: ["audit", str(_ungrouped_manifest(f, s))],
            "leakage cannot be checked; pass --groups", check=_not_clean),
    accepts("no patient ids / audit --allow-ungrouped", lambda f, s: [
        "audit", str(_ungrouped_manifest(f, s)), "--allow-ungrouped"], "no patient ids"),
    accepts("BreakHis-derived crop names / split", _crops, check=_patients_are(3)),
    refuses("re-saved duplicate across splits / audit", _resaved_leak,
            "duplicate image (same pixels) across splits"),
    accepts("byte-identical duplicate / split", _byte_dup, "duplicate images:"),
    refuses("CSV: one file, two labels / split", lambda f, s: ["split", str(_csv(f, [
        {"path": "a.jpg", "label": "benign"}, {"path": "a.jpg", "label": "malignant"}])),
        "--out", str(f / "o")], "listed with different labels"),
    refuses("CSV: label contradicts file name / split", lambda f, s: ["split", str(_csv(f, [
        {"path": "SOB_M_DC-14-2523-40-001.png", "label": "benign"}])), "--out", str(f / "o")],
        "says malignant"),
    refuses("CSV: label contradicts subtype / split", lambda f, s: ["split", str(_csv(f, [
        {"path": "x.jpg", "label": "malignant", "subtype": "adenosis"}])), "--out",
        str(f / "o")], "contradicts subtype adenosis"),
    accepts("CSV: same row twice / split", lambda f, s: ["split", str(_csv(f, [
        {"path": "x.jpg", "label": "benign", "group": "p1"},
        {"path": "x.jpg", "label": "benign", "group": "p1"},
        {"path": "y.jpg", "label": "malignant", "group": "p2"}])), "--out", str(f / "o"),
        "--val", "0", "--test", "0.5"], "kept once"),
    refuses("manifest split 'Train ' / audit", lambda f, s: ["audit", str(_manifest(
        f, s, _first("split", "Train ")))],
        "must be one of train, val, test"),
    refuses("manifest split '' / train", lambda f, s: _train(f, _manifest(
        f, s, _first("split", ""))), "line 2 ''"),
    refuses("k-fold split_fold1 'TEST' / audit", lambda f, s: ["audit", str(_manifest(
        f, s, _first("split_fold1", "TEST"),
        "kfold"))], "column split_fold1 must be one of"),
    refuses("empty CSV / split", lambda f, s: ["split", str(_touch(f / "e.csv", b"")), "--out",
                                                str(f / "o")], "empty file"),
    refuses("non-UTF-8 CSV / split", lambda f, s: ["split", str(_touch(
        f / "u.csv", b"path,label\n\xff\xfe.png,benign\n")), "--out", str(f / "o")],
        "not UTF-8"),
    refuses("groups CSV without group column / split", lambda f, s: [
        "split", str(UCSB), "--out", str(f / "o"), "--groups",
        str(_touch(f / "g.csv", b"path,patient\na,b\n"))], "needs columns path,group"),
    # evaluation
    accepts("predictions without patient ids / evaluate", lambda f, s: [
        "evaluate", str(_preds(f, ROWS)), "--out", str(f / "e"), "--bootstrap", "50"],
        "n/a: no patient ids; pass --groups CSV",
        check=_json("e/metrics.json", "patient_accuracy", True)),
    accepts("two patients per class / evaluate", lambda f, s: [
        "evaluate", str(_preds(f, PATIENTS)), "--out", str(f / "e"), "--bootstrap", "50"],
        "too few patients to resample", check=_json("e/metrics.json", "ci95.accuracy", True)),
    accepts("patient ids from --groups / evaluate", lambda f, s: [
        "evaluate", str(_preds(f, ROWS)), "--out", str(f / "e"), "--bootstrap", "0",
        "--groups", str(_touch(f / "g.csv", b"path,group\na.png,A\nb.png,B\nc.png,C\nd.png,D\n"))],
        "4 patients", check=_json("e/metrics.json", "patient_accuracy", False)),
    refuses("probability out of range / evaluate", lambda f, s: [
        "evaluate", str(_preds(f, [("a.png", "A", "benign", 1.5)])), "--out", str(f / "e")],
        "probabilities must be numbers in [0, 1]"),
    accepts("HTML in a CSV header / evaluate", lambda f, s: [
        "evaluate", str(_touch(f / "p.csv", (f"path,patient_id,label,p_{EVIL},p_x\n"
                                             f"a.png,A,{EVIL},0.9,0.1\nb.png,B,x,0.2,0.8\n")
                               .encode())), "--out", str(f / "e"), "--bootstrap", "0"],
        check=_evil_header),
    accepts("rows with model errors / evaluate", lambda f, s: [
        "evaluate", str(_preds(f, PATIENTS, error=["", "", "", "non-finite model output"])),
        "--out", str(f / "e"), "--bootstrap", "0"], "1 row(s) have no prediction"),
    refuses("missing predictions / evaluate", lambda f, s: [
        "evaluate", str(f / "none.csv"), "--out", str(f / "e")], "does not exist"),
    # model files
    refuses("malicious pickle / predict", lambda f, s: [
        "predict", str(_evil(f)), str(BREAKHIS[0]), "--out", str(f / "p.csv")],
        "GLOBAL posix.system", check=_no("weights_only")),
    refuses("malicious torch zip / explain", lambda f, s: [
        "explain", str(_evil(f, True)), str(BREAKHIS[0]), "--out", str(f / "c")],
        "GLOBAL posix.system", check=_no("weights_only")),
    refuses("malicious pickle as --weights / train", lambda f, s: _train(
        f, s["manifest"], "--weights", str(_evil(f))), "GLOBAL posix.system",
        check=_no("weights_only")),
    refuses("random bytes .pt / predict", lambda f, s: [
        "predict", str(_touch(f / "r.pt", os.urandom(2000))), str(BREAKHIS[0]), "--out",
        str(f / "p.csv")], "not a readable model file"),
    refuses("NaN weights / predict", lambda f, s: [
        "predict", str(_checkpoint(f, s, _nan_weights)), str(BREAKHIS[0]), "--out",
        str(f / "p.csv")], "weights contain NaN or infinite values"),
    refuses("NaN-output ONNX / predict --backend onnx", lambda f, s: [
        "predict", str(nan_onnx(f / "nan.onnx")), *map(str, BREAKHIS[:2]), "--out",
        str(f / "out" / "p.csv"), "--backend", "onnx", "--workers", "0"],
        "non-finite model output", check=_nan_rows_have_no_class),
    refuses("checkpoint without timm_name / predict", lambda f, s: [
        "predict", str(_checkpoint(f, s, lambda o: o["meta"].pop("timm_name"))),
        str(BREAKHIS[0]), "--out", str(f / "p.csv")], "timm_name is missing"),
    refuses("unknown timm name / predict", lambda f, s: [
        "predict", str(_checkpoint(f, s, lambda o: o["meta"].update(timm_name="resnet9000"))),
        str(BREAKHIS[0]), "--out", str(f / "p.csv")], "is not a timm model name"),
    refuses("input_size 100000x100000 / predict", lambda f, s: [
        "predict", str(_checkpoint(f, s, lambda o: o["meta"]["preprocess"].update(
            input_size=[100000, 100000]))), str(BREAKHIS[0]), "--out", str(f / "p.csv")],
        "input_size [100000, 100000]"),
    refuses("ONNX input_size 100000 / predict", lambda f, s: [
        "predict", str(nan_onnx(f / "big.onnx", meta={"preprocess": json.dumps(
            {"input_size": [100000, 100000], "mean": [0.5] * 3, "std": [0.5] * 3,
             "interpolation": "bilinear"})})), str(BREAKHIS[0]), "--out", str(f / "p.csv")],
        "integers in [8, 4096]"),
    refuses("ONNX broken metadata JSON / predict", lambda f, s: [
        "predict", str(nan_onnx(f / "b.onnx", meta={"classes": "[benign"})), str(BREAKHIS[0]),
        "--out", str(f / "p.csv")], "'classes' is not valid JSON"),
    refuses("ONNX external-data traversal / predict", lambda f, s: [
        "predict", str(_traversal_onnx(f)), str(BREAKHIS[0]), "--out", str(f / "p.csv")],
        "not a readable ONNX model"),
    refuses("ONNX without histoclass metadata / predict", lambda f, s: [
        "predict", str(nan_onnx(f / "x.onnx", meta={"histoclass": "other"})), str(BREAKHIS[0]),
        "--out", str(f / "p.csv")], "without histoclass metadata"),
    refuses("ensemble member changed / predict", _changed_member, "has changed"),
    # stain targets
    refuses("greyscale Vahadane target / stain", lambda f, s: [
        "stain", str(UCSB), "--method", "vahadane", "--target", str(s["grey"]), "--out",
        str(f / "o")], "a stain is absent"),
    refuses("blank target / stain", lambda f, s: [
        "stain", str(UCSB), "--method", "macenko", "--target", str(_blank(f)), "--out",
        str(f / "o")], "tissue"),
    refuses("broken stain JSON / stain", lambda f, s: [
        "stain", str(UCSB), "--method", "vahadane", "--target",
        str(_touch(f / "t.json", b'{"method": ')), "--out", str(f / "o")],
        "not a JSON stain target"),
    refuses("greyscale target / train --stain vahadane", lambda f, s: _train(
        f, s["manifest"], "--stain", "vahadane", "--stain-target", str(s["grey"])),
        "a stain is absent"),
    # outputs
    refuses("read-only output folder / split", lambda f, s: [
        "split", str(UCSB), "--out", str(_mount(f, s, "64k", True) / "s")],
        "Read-only file system"),
    refuses("full disk / split", lambda f, s: [
        "split", "sample", "--out", str(_mount(f, s, "12k") / "s")],
        "No space left on device", check=_gone("*.tmp")),
    refuses("full disk / export", lambda f, s: [
        "export", str(s["model"]), "--out", str(_mount(f, s, "12k") / "m.onnx"),
        "--no-check"], "No space left on device", check=_gone("*.tmp", "m.onnx")),
    refuses("--out is a folder / predict", lambda f, s: _predict(f, s, str(BREAKHIS[0]), out="."),
            "is a folder"),
    refuses("--out is the model / predict", lambda f, s: [
        "predict", str(s["model"]), str(BREAKHIS[0]), "--out", str(s["model"])],
        "is also an input"),
    refuses("--out named *.skipped.csv / predict", lambda f, s: _predict(
        f, s, str(BREAKHIS[0]), out="x.skipped.csv"), "lists the inputs it left out"),
    accepts("two runs into one folder / predict", _two_runs, check=_both_skip_lists),
    accepts("--out d/skipped.csv / predict", lambda f, s: _predict(
        f, s, str(BREAKHIS[0]), str(_touch(f / "bad.png", b"x")), out="o/skipped.csv"),
        check=_old_name),
    accepts("stale .tmp files in the run folder / train", _stale, check=_gone("*.tmp")),
    # training and runs
    refuses("image unreadable after split / train", _unreadable_after_split,
            "cannot be read (changed since the split?)", check=_gone("last.pt")),
    refuses("resume with another --select / train", _resume_select, "select 'balanced_accuracy'"),
    refuses("resume with a changed manifest / train", _resume_manifest, "manifest_sha256"),
    refuses("config typo in a nested block / run", lambda f, s: [
        "run", str(_run_config(f, train={"epoch": 1}))], "train: unknown key(s) epoch",
        check=_gone("manifest.csv")),
    refuses("config value of the wrong type / run", lambda f, s: [
        "run", str(_run_config(f, train={"epochs": "1"}))], "epochs = '1' (str) must be int",
        check=_gone("manifest.csv")),
    refuses("run folder with other settings / run", _other_settings,
            "holds a run with other settings"),
    refuses("offline demo / demo", lambda f, s: ["demo", "--out", str(f / "demo")],
            "--no-pretrained", "--weights-dir DIR", env=OFFLINE, check=_gone("demo")),
]


def _touch(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _blank(folder: Path) -> Path:
    Image.new("RGB", (64, 64), "white").save(folder / "blank.png")
    return folder / "blank.png"
