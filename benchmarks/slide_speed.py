"""Whole-slide throughput and memory: histoclass end to end vs raw ONNX Runtime vs TIAToolbox.

Slide: a pyramidal tiled TIFF (zlib, 0.5 um/px) covered edge to edge with the bundled real
BreakHis fields (700x460), so every tile is tissue. Network: EfficientNet-B0
(``tf_efficientnet_b0``, randomly initialised: weights do not change speed), 224 px input, a
224 px field at 0.5 um/px, so tiles are read at level 0 without resizing.

Rows (tiles/s, best of ``--repeat``, interleaved so a load spike hits every row alike):

- ``raw ORT``: a plain ONNX Runtime session running the bare network (float32 NCHW input) on
  tiles already read and normalised: the ceiling, no slide reading at all;
- ``histoclass slide, onnx``: ``predict_slide`` on the ONNX export (uint8 input): tissue mask,
  reading, preparation, inference, ``tiles.csv`` appends (``scoring`` = the tile loop's rate;
  ``end to end`` adds the thumbnail, mask, heat map, GeoJSON and figures);
- ``histoclass slide, torch``: the same on the PyTorch checkpoint;
- ``TIAToolbox PatchPredictor``: its WSI mode on the same slide, tile size, resolution and
  network (the timm module), run in a benchmark-only virtualenv (``--tia-python``), when it
  installs and runs; otherwise the reason is printed.

Memory: peak RSS of ``predict_slide`` (onnx, a fresh process each) on sparse slides of 20000^2
and 80000^2 pixels with the same tissue (36 fields of 512^2 px), and 80000^2 with 16x the tissue.

    python benchmarks/slide_speed.py --tia-python /tmp/tiavenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from histoclass.deploy.export import export_onnx
from histoclass.deploy.runtime import OnnxClassifier
from histoclass.models import (
    load_model_file,
    member_meta,
    model_preprocess,
    save_checkpoint,
)
from histoclass.slides import Slide, SlideOptions, predict_slide
from slide_helpers import sample_images, write_slide, write_sparse_slide

ARCH, MPP, FIELD = "tf_efficientnet_b0", 0.5, 224


def make_model(work: Path) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=2).eval()
    meta = member_meta(ARCH, ARCH, ["benign", "malignant"], model_preprocess(model),
                       train_mpp=MPP, train_field=[FIELD, FIELD])
    return save_checkpoint(work / "b0.pt", model, meta)


def tissue_slide(path: Path, cols: int, rows: int) -> Path:
    """``cols x rows`` tiles of 224 px covered with real fields, edge to edge."""
    imgs = [i for i in sample_images() if i.shape[:2] == (460, 700)]
    w, h = cols * FIELD, rows * FIELD
    canvas = np.empty((h, w, 3), np.uint8)
    k = 0
    for y in range(0, h, 460):
        for x in range(0, w, 700):
            img = imgs[k % len(imgs)]
            k += 1
            canvas[y:y + 460, x:x + 700] = img[:h - y, :w - x]
    return write_slide(path, canvas, mpp=MPP, levels=4)


def raw_ort(bare: Path, tiles: list[np.ndarray], clf: OnnxClassifier, batch: int,
            threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(bare), opts, providers=["CPUExecutionProvider"])
    xs = [clf.normalize(np.stack(tiles[i:i + batch])) for i in range(0, len(tiles), batch)]
    sess.run(None, {"image": xs[0]})  # warm-up, as the slide runs' model probe is
    t = time.perf_counter()
    for x in xs:
        sess.run(None, {"image": x})
    return len(tiles) / (time.perf_counter() - t)


TIA_SCRIPT = r"""
import json, sys, time, shutil
import numpy as np, timm, torch
from pathlib import Path
slide, ckpt, out, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
import tiatoolbox
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.engine.patch_predictor import PatchPredictor
from tiatoolbox.models.models_abc import ModelABC
torch.set_num_threads(int(sys.argv[5]))
state = torch.load(ckpt, weights_only=True)
net = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=2)
net.load_state_dict(state["state_dict"])
net.eval()
mean = torch.tensor(state["meta"]["preprocess"]["mean"]).view(1, 3, 1, 1)
std = torch.tensor(state["meta"]["preprocess"]["std"]).view(1, 3, 1, 1)


class Wrapped(ModelABC):  # the same network and normalisation as histoclass's
    def __init__(self):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def infer_batch(model, batch_data, device="cpu"):
        x = batch_data.to(torch.float32).permute(0, 3, 1, 2).div(255.0).sub(mean).div(std)
        with torch.inference_mode():
            return model(x).softmax(-1).numpy()

    @staticmethod
    def postproc(image):
        return np.argmax(image, axis=-1)


cfg = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": 0.5}],
                             patch_input_shape=(224, 224), stride_shape=(224, 224))
pred = PatchPredictor(model=Wrapped(), batch_size=batch, num_workers=2, device="cpu",
                      verbose=False)
shutil.rmtree(out, ignore_errors=True)
from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader
reader = OpenSlideWSIReader(slide)  # through OpenSlide, as histoclass reads it
t = time.perf_counter()
res = pred.run([reader], patch_mode=False, ioconfig=cfg, save_dir=out, overwrite=True,
               output_type="zarr", return_probabilities=True, auto_get_mask=True)
dt = time.perf_counter() - t
import zarr
path = next(iter(res.values())) if isinstance(res, dict) else res
z = zarr.open(str(path), mode="r")
n = int(z["probabilities"].shape[0])
print(json.dumps({"seconds": dt, "tiles": n, "version": tiatoolbox.__version__,
                  "torch": torch.__version__}))
"""


def tiatoolbox_rate(python: str | None, slide: Path, ckpt: Path, work: Path, batch: int,
                    threads: int) -> tuple[float | None, str]:
    if not python or not Path(python).exists():
        return None, f"no benchmark virtualenv python at {python!r}"
    script = work / "tia_run.py"
    script.write_text(TIA_SCRIPT)
    r = subprocess.run([python, str(script), str(slide), str(ckpt), str(work / "tia_out"),
                        str(batch), str(threads)], capture_output=True, text=True, timeout=3600)
    if r.returncode:
        return None, (r.stderr.strip().splitlines() or ["exit " + str(r.returncode)])[-1]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["tiles"]:
        return None, f"TIAToolbox {out['version']} ran but wrote no predictions"
    return out["tiles"] / out["seconds"], (f"TIAToolbox {out['version']} on torch "
                                           f"{out['torch']}, {out['tiles']} tiles")


RSS_CHILD = r"""
import sys, json
from histoclass.api import open_classifier
from histoclass.slides import predict_slide, SlideOptions
clf = open_classifier(sys.argv[1], "onnx")
s = predict_slide(clf, sys.argv[2], sys.argv[3], SlideOptions(batch_size=16, restart=True))
# VmHWM, not ru_maxrss: Linux carries a parent's peak into its exec'd child's ru_maxrss.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(json.dumps({"rss_mb": hwm / 1024, "tiles": s["tiles_scored"], "grid": s["tiles"]["grid"]}))
"""


def rss(onnx: Path, work: Path) -> list[tuple[str, dict]]:
    """Peak RSS on sparse slides: the same tissue on 1x and 16x the area, then 16x the tissue."""
    imgs = [i for i in sample_images() if i.shape[:2] == (460, 700)]
    rows = []
    for side, n_blocks in ((20000, 36), (80000, 36), (80000, 576)):
        step = max(1, int((side // 512) / np.sqrt(n_blocks)))
        spots = [(c, r) for r in range(0, side // 512, step) for c in range(0, side // 512, step)]
        blocks = {k: np.pad(imgs[i % len(imgs)], ((0, 52), (0, 0), (0, 0)),
                            constant_values=255)[:512, :512]
                  for i, k in enumerate(spots[:n_blocks])}
        path = write_sparse_slide(work / f"sparse{side}_{n_blocks}.tiff", side, side, blocks,
                                  MPP, levels=9)
        r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(onnx), str(path),
                            str(work / "rss_out")], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        rows.append((f"{side}^2, {n_blocks} blocks", json.loads(r.stdout.strip().splitlines()[-1])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slide_bench"))
    ap.add_argument("--cols", type=int, default=30)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tia-python", default="/tmp/tiavenv/bin/python")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true")
    args = ap.parse_args()
    if args.rss_only:
        args.work.mkdir(parents=True, exist_ok=True)
        onnx = export_onnx(make_model(args.work), args.work / "b0.onnx")
        print(f"{'slide':24s} {'grid tiles':>11s} {'tissue tiles':>13s} {'peak RSS MB':>12s}")
        for name, r in rss(onnx, args.work):
            print(f"{name:24s} {r['grid']:11d} {r['tiles']:13d} {r['rss_mb']:12.0f}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    ckpt = make_model(args.work)
    onnx = export_onnx(ckpt, args.work / "b0.onnx")
    bare = export_onnx(ckpt, args.work / "b0.bare.onnx", uint8_input=False)
    slide = tissue_slide(args.work / "tissue.tiff", args.cols, args.rows)
    clf, torch_clf = OnnxClassifier(onnx, threads=args.threads), load_model_file(ckpt)
    # min_tissue 0: every tile of this all-tissue slide, the same tiles TIAToolbox scores.
    opts = SlideOptions(batch_size=args.batch, workers=2, restart=True, min_tissue=0.0)
    best: dict[str, float] = {}

    def keep(name: str, rate: float | None) -> None:
        if rate:
            best[name] = max(best.get(name, 0.0), rate)

    n_tiles, tiles = 0, []
    for _ in range(args.repeat):
        for name, c in (("onnx", clf), ("torch", torch_clf)):
            t = time.perf_counter()
            s = predict_slide(c, slide, args.work / f"out_{name}", opts)
            keep(f"histoclass slide, {name}: scoring", s["tiles_per_s"])
            keep(f"histoclass slide, {name}: end to end",
                 s["tiles_scored"] / (time.perf_counter() - t))
            n_tiles = s["tiles_scored"]
        if not tiles:
            import pandas as pd

            frame = pd.read_csv(args.work / "out_onnx" / "tissue" / "tiles.csv")
            with Slide(slide) as sl:
                tiles = [clf.preparation(sl.read(r.x, r.y, r.width, r.height, 0))[0]
                         for r in frame.itertuples()]
        keep("raw ORT (bare network, tensors ready)", raw_ort(bare, tiles, clf, args.batch,
                                                              args.threads))
    tia, why = tiatoolbox_rate(args.tia_python, slide, ckpt, args.work, args.batch,
                               args.threads)
    ceiling = best["raw ORT (bare network, tensors ready)"]
    print(f"\n{ARCH} 224 px at {MPP} um/px, {n_tiles} tissue tiles ({args.cols}x{args.rows} "
          f"grid), batch {args.batch}, {args.threads} threads, best of {args.repeat}")
    print(f"{'path':44s} {'tiles/s':>8s} {'x raw ORT':>9s}")
    for name, rate in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"{name:44s} {rate:8.1f} {rate / ceiling:9.2f}")
    if tia:
        print(f"{'TIAToolbox PatchPredictor (torch)':44s} {tia:8.1f} {tia / ceiling:9.2f}  "
              f"({why}); histoclass onnx / TIA = "
              f"{best['histoclass slide, onnx: end to end'] / tia:.2f}x, torch / TIA = "
              f"{best['histoclass slide, torch: end to end'] / tia:.2f}x")
    else:
        print(f"TIAToolbox: not measured ({why})")
    if not args.skip_rss:
        print(f"\n{'slide':24s} {'grid tiles':>11s} {'tissue tiles':>13s} {'peak RSS MB':>12s}")
        for name, r in rss(onnx, args.work):
            print(f"{name:24s} {r['grid']:11d} {r['tiles']:13d} {r['rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
