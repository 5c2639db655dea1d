"""Little data (issue 13 §5): a hand-written frozen-feature baseline vs the histoclass CLI.

On the 40 UCSB breast images (``../shared/data/ucsb-breast``; groups = the tissue-microarray
block and date, the closest thing to a patient there, per its README), group-disjoint k folds
(``histoclass split --protocol kfold``): every image is tested once by models that never saw
its group.

* baseline: frozen ImageNet ``efficientnet_lite0/1/2`` features, 9 native-resolution 224 px
  tiles per image averaged, logistic regression with ``C`` chosen by inner group CV on the
  fold's training rows (train + val) only (:mod:`little_data_probe`);
* CLI: ``histoclass train --model efficientnet_liteK --weights <timm state dict>`` per member
  and fold (finetune + resize), soft/stack ensembles of the three (``histoclass ensemble``,
  fitted and calibrated on val: its own temperature and ``--refer-risk`` threshold); slots
  for ``--input tiles`` / ``--head linear`` runs, printed as "not available in this build"
  when ``histoclass train --help`` does not offer them.

Metrics pooled over folds: accuracy, balanced accuracy, ECE before/after temperature scaling
(the CLI model's own T, fitted by histoclass on held-out scores: the fold's val split, or the
out-of-fold logits of a ``--probe-select cv`` member; inner out-of-fold scores for the
probe), coverage at ALPHA = 0.1 (threshold from the same held-out scores; a fold where no
threshold can be certified refers all its images). Crossover: k training images per class,
fine-tuning vs the frozen probe (lite0).

    python benchmarks/little_data.py --folds 3 --epochs 10 --md /tmp/little.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from little_data_probe import (
    ALPHA,
    DELTA,
    fit_probe,
    fold_scores,
    logits_from_p,
    summary,
    tile_features,
    timm_state_dict,
)
from sklearn.metrics import accuracy_score

from histoclass.calibration import choose_refer_threshold

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ucsb-breast" / "manifest.csv"
LITES = (0, 1, 2)
VARIANTS = {"finetune+resize": [], "finetune+tiles": ["--input", "tiles"],
            "linear+resize": ["--head", "linear"], "linear+tiles": ["--head", "linear",
                                                                    "--input", "tiles"],
            # C by patient-disjoint inner CV over train + val, refit on both; the member's own
            # temperature and referral threshold (fitted on its out-of-fold logits) are scored
            "linear+tiles cv": ["--head", "linear", "--input", "tiles", "--probe-select", "cv",
                                "--refer-risk", str(ALPHA), "--refer-delta", str(DELTA)]}
IN_SAMPLE = "val is in-sample for --probe-select cv members"


def histoclass(*args: str, threads: int = 1, check: bool = True) -> str | None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": str(threads)}
    print("$ histoclass " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "histoclass", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode and not check:  # a refusal to report, e.g. stacking on a 1-class val
        print(proc.stderr.strip().splitlines()[-1], flush=True)
        return None
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def available(flags: list[str], help_text: str) -> bool:
    """Whether every ``--flag`` of a variant is offered by ``histoclass train --help``."""
    return all(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)
               for f in flags if f.startswith("--"))  # --head must not match --head-lr


def scores(model: Path, manifest: Path, split: str, fold: int | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 2]`` probabilities of one split, through the library path ``histoclass predict``
    uses: as predicted, and before the model's own temperature (its ``raw.p_`` columns; the
    predicted ones when it has none). An empty ``raw.p_`` cell underflowed under a ``T < 1``:
    its calibrated value (0 or 1) stands in, within ``exp(-745 T)`` of the truth (5.8e-4 at
    the smallest T, 0.01)."""
    from histoclass.models.ensemble import load_model_file
    from histoclass.predict import predict_manifest

    frame = predict_manifest(load_model_file(model), manifest, split, fold, workers=0).frame
    p = frame["p_malignant"].to_numpy(float)
    r = frame.get("raw.p_malignant", frame["p_malignant"]).to_numpy(float)
    r = np.where(np.isnan(r), p, r)
    return np.column_stack([1 - p, p]), np.column_stack([1 - r, r])


def cli_fold(run: Path, manifest: Path, fold: int | None, weights: Path, flags: list[str],
             args) -> Path:
    if not (run / "best.pt").is_file():
        model = f"efficientnet_{weights.stem}"  # weights are written as lite<K>.pth
        histoclass("train", str(manifest), "--model", model, "--weights", str(weights),
                   "--out", str(run), "--epochs",
                   str(args.epochs), "--batch-size", str(args.batch_size), "--image-size",
                   "224", "--workers", "0", "--device", "cpu", "--cache-dir",
                   str(args.out / "cache"), *flags,
                   *(["--fold", str(fold)] if fold is not None else []))
    return run / "best.pt"


def scored(model: Path, manifest: Path, fold: int | None, y_val, y_test) -> dict:
    """A CLI model scored with its own temperature (``ECE`` before it, ``ECE after T`` with
    it: fitted by histoclass on val, out-of-fold for ``--probe-select cv``, on the combined
    val probabilities for an ensemble) and its own ``--refer-risk`` threshold; a model trained
    without ``--refer-risk`` gets the threshold that rule would choose on its val scores. An
    ensemble of cv members has neither (its val outputs are in-sample): scored as predicted."""
    from histoclass.models.ensemble import load_model_file

    pt, raw = scores(model, manifest, "test", fold)  # after / before the model's own T
    ens = load_model_file(model)
    if ens.is_ensemble and (ens.calibration or {}).get("reason"):
        return {"T": None, "threshold": None, "p": pt, "p_cal": None}
    threshold = ens.confidence_threshold
    rule = ens.refer_risk if ens.is_ensemble else ens.members[0].meta.get("refer_risk")
    if rule is None:  # not asked at training: what the rule would choose on val
        pv = scores(model, manifest, "val", fold)[0]
        found = choose_refer_threshold(pv.max(1), pv.argmax(1) == y_val, ALPHA, DELTA)
        threshold = None if found is None else found["threshold"]
    return {"T": ens.temperature, "threshold": threshold,
            "p": raw, "p_cal": pt}


def stale(path: Path) -> bool:
    """An ensemble file without the calibration record of ``histoclass ensemble`` (version 1)."""
    import torch

    return torch.load(path, weights_only=True).get("calibration") is None


def row(name: str, s: dict | None, seconds: float, note: str = "") -> str:
    if s is None:
        return f"| {name} | not available in this build | | | | | | |"
    if s["ece_t"] is None:  # no held-out scores: no temperature, no threshold to state
        return (f"| {name} | {s['acc']:.3f} | {s['bacc']:.3f} | {s['ece']:.3f} | n/a "
                f"| n/a ({IN_SAMPLE}) | - | {seconds:.0f}{note} |")
    cov = f"{s['coverage']:.2f} ({s['certified']}/{s['folds']} folds certified)"
    err = "-" if s["acc_error"] is None else f"{s['acc_error']:.2f}"
    return (f"| {name} | {s['acc']:.3f} | {s['bacc']:.3f} | {s['ece']:.3f} | {s['ece_t']:.3f} "
            f"| {cov} | {err} | {seconds:.0f}{note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("/tmp/histoclass-little-data"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, nargs="*", default=[2, 4, 8],
                    help="crossover: training images per class (empty: skip)")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"../shared/data absent: {args.data} not found")
    import torch

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    histoclass("split", str(args.data), "--out", str(args.out / "split"), "--protocol",
               "kfold", "--folds", str(args.folds))
    manifest = args.out / "split" / "manifest.csv"
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    y = (frame["label"] == "malignant").to_numpy(int)
    groups = frame["patient_id"].to_numpy()
    folds = list(range(args.folds))
    col = {f: frame[f"split_fold{f}"].to_numpy() for f in folds}
    y_test = np.concatenate([y[col[f] == "test"] for f in folds])
    weights = {k: timm_state_dict(k, args.out / "weights" / f"lite{k}.pth") for k in LITES}
    paths = frame["path"].tolist()
    lines = ["| model | accuracy | bal. acc | ECE | ECE after T | coverage @ALPHA=0.1 "
             "| error of accepted | s |", "|---|---|---|---|---|---|---|---|"]
    feats = {}
    for k in LITES:  # --- the hand-written baseline
        feats[k] = tile_features(k, weights[k], paths, args.out / "feats" / f"lite{k}.npy")
    feats["0+1+2"] = np.concatenate([feats[k] for k in LITES], axis=1)
    chosen = {}
    for k, x in feats.items():
        t0, parts = time.perf_counter(), []
        for f in folds:
            tr, te = col[f] != "test", col[f] == "test"
            probe, c, oof = fit_probe(x[tr], y[tr], groups[tr])
            chosen.setdefault(k, []).append(c)
            parts.append(fold_scores(oof, y[tr], logits_from_p(probe.predict_proba(x[te])[:, 1])))
        name = f"baseline: frozen lite{k} tiles + logreg (C {chosen[k]})"
        lines.append(row(name, summary(y_test, parts), time.perf_counter() - t0))
    help_text = histoclass("train", "--help")
    for variant, flags in VARIANTS.items():  # --- the CLI pipeline
        if not available(flags, help_text):
            lines += [row(f"CLI {variant} lite{k}", None, 0) for k in LITES]
            lines += [row(f"CLI {variant} {m} ensemble", None, 0) for m in ("soft", "stack")]
            continue
        res = {k: [] for k in (*LITES, "soft", "stack")}
        secs = dict.fromkeys(res, 0.0)
        refused: dict = {"soft": [], "stack": []}
        for f in folds:
            yv, yt = y[col[f] == "val"], y[col[f] == "test"]
            members = []
            for k in LITES:
                t0 = time.perf_counter()
                run = args.out / variant / f"lite{k}" / f"fold{f}"
                members.append(cli_fold(run, manifest, f, weights[k], flags, args))
                res[k].append(scored(members[-1], manifest, f, yv, yt))
                secs[k] += time.perf_counter() - t0
            for method in ("soft", "stack"):
                t0 = time.perf_counter()
                ens = args.out / variant / f"{method}-fold{f}.pt"
                if ens.is_file() and stale(ens):  # written before ensembles were calibrated
                    ens.unlink()
                if not ens.is_file() and histoclass(
                        "ensemble", *map(str, members), "--method", method, "--manifest",
                        str(manifest), "--fold", str(f), "--out", str(ens), "--workers", "0",
                        "--device", "cpu", "--refer-risk", str(ALPHA), "--refer-delta",
                        str(DELTA), check=False) is None:
                    refused[method].append(f)
                    continue
                res[method].append(scored(ens, manifest, f, yv, yt))
                secs[method] += time.perf_counter() - t0
        for k, parts in res.items():
            name = f"CLI {variant} " + (f"lite{k}" if k in LITES else f"{k} ensemble")
            if refused.get(k):
                lines.append(f"| {name} | refused in fold(s) {refused[k]} (histoclass ensemble "
                             "said why, above); no pooled figure | | | | | | |")
                continue
            lines.append(row(name, summary(y_test, parts), secs[k]))
    print("\n".join(lines), flush=True)  # before the crossover, which may be cut short
    cross = crossover(args, frame, y, col, folds, feats[0], weights[0]) if args.k else []
    text = "\n".join([*lines, "", *cross, "", machine(time.perf_counter() - t_all, args)])
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


def crossover(args, frame, y, col, folds, x, weights) -> list[str]:
    """k training images per class (from each fold's train split, seed 0): lite0 fine-tuned
    through the CLI (selecting on the fold's val split) vs the frozen lite0 probe (C by inner
    CV on the k-per-class images); both scored on the fold's test groups, pooled."""
    out = ["| train images per class | finetune+resize acc | frozen probe acc | test images |",
           "|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for k in args.k:
        yt_all, ft_all, pr_all = [], [], []
        for f in folds:
            tr = np.flatnonzero(col[f] == "train")
            pick = np.concatenate([rng.permutation(tr[y[tr] == c])[:k] for c in (0, 1)])
            te = col[f] == "test"
            probe, _, _ = fit_probe(x[pick], y[pick], None)
            sub = frame.drop(columns=[c for c in frame if c.startswith("split_fold")] + ["fold"])
            split = np.where(np.isin(np.arange(len(frame)), pick), "train", col[f])
            keep = (split != "train") | np.isin(np.arange(len(frame)), pick)
            sub = sub.assign(split=split, protocol="patient")[keep]
            man = args.out / "crossover" / f"k{k}-fold{f}" / "manifest.csv"
            man.parent.mkdir(parents=True, exist_ok=True)
            sub.to_csv(man, index=False)
            best = cli_fold(man.parent / "run", man, None, weights, [], args)
            yt_all.append(y[te])
            ft_all.append((scores(best, man, "test", None)[0][:, 1] > 0.5).astype(int))
            pr_all.append(probe.predict(x[te]))
        yt = np.concatenate(yt_all)
        out.append(f"| {k} | {accuracy_score(yt, np.concatenate(ft_all)):.3f} | "
                   f"{accuracy_score(yt, np.concatenate(pr_all)):.3f} | {len(yt)} |")
    return out


def machine(seconds: float, args) -> str:
    import timm
    import torch

    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU, "
            f"torch {torch.__version__}, timm {timm.__version__}, 1 thread per run, "
            f"{args.folds} folds, {args.epochs} epochs, batch {args.batch_size}, ALPHA {ALPHA}; "
            f"total {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
