"""A linear probe on a frozen backbone (``histoclass train --head linear``).

The backbone is never trained: it embeds every train and validation image once, in eval mode,
through the prediction path's preparation (stain, resize, normalise; no augmentation), with the
embeddings cached across runs (:mod:`histoclass.train.features`). A scikit-learn
``LogisticRegression`` (lbfgs, L2; multinomial for more than two classes, the single logistic
of scikit-learn's binary case for two) is fitted on the *standardised* train embeddings for
every ``C`` of a log grid (:data:`C_GRID`); ``C`` is chosen by the validation split only, by the
run's ``--select`` score (ties: lower validation loss, then the smaller ``C``). The head kept is
the one fitted on the train split with that ``C``: no refit on train + validation, so the
stored validation metrics are those of the saved member (optimistic only by the choice of ``C``).

The probe is then folded into timm's own classifier layer (``model.get_classifier()``), the
standardisation with it: ``W = coef / scale``, ``b = intercept - W @ mean``. For two classes
the logistic's one row ``w`` becomes the rows ``[-w/2, +w/2]`` (biases ``[-b/2, +b/2]``), so
the softmax of the two logits is exactly the logistic ``sigmoid(w.x + b)``. The saved file is an
ordinary member checkpoint (``meta["head"] = "linear"``, the fit in ``meta["linear"]``):
predict, ensembles, explain, export, serve and ``histoclass.load`` use it as any other member.

Only the embedding rule ``cls`` (timm's pooled pre-logits, what the classifier layer sees) can
be folded; a backbone whose embedding is ``cls+mean_patch`` is refused, because its classifier
layer never sees the patch-token mean.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoclass import models
from histoclass.data.files import check_output, remove_stale_temps
from histoclass.models.checkpoint import save_checkpoint
from histoclass.models.classifier import Preparation
from histoclass.models.sources import resolve_backbone
from histoclass.train import records
from histoclass.train.config import TrainConfig, fingerprint
from histoclass.train.data import build_data, input_mode
from histoclass.train.distributed import Dist
from histoclass.train.epoch import better, metrics
from histoclass.train.features import FeatureCache, cache_root, extract, setting_key
from histoclass.train.features import weights_sha256 as backbone_sha256

log = logging.getLogger(__name__)
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # 1e-4 .. 1e2, half a decade apart
MAX_ITER = 2000
REFIT = "none: the head kept is the one fitted on the train split with the chosen C"


ABSENT_LOGIT = -30.0  # classes without train images: softmax weight ~1e-13 of a present class


def probe_logits(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Logits of a fitted logistic regression, shaped as the folded classifier gives them:
    ``[N, K]``, and for a binary model (one row) ``[-z/2, +z/2]``, whose softmax is
    ``sigmoid(z)``."""
    z = x @ np.asarray(coef, np.float64).T + np.asarray(intercept, np.float64)
    return np.concatenate([-z / 2, z / 2], axis=1) if z.shape[1] == 1 else z


def expand_probe(coef: np.ndarray, intercept: np.ndarray, present: list[int], k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A probe fitted on the ``present`` classes only, as ``k`` output rows: the present ones
    in their places (a binary probe as ``[-w/2, +w/2]``), the others weight 0 and bias
    :data:`ABSENT_LOGIT`. All classes present: ``coef``/``intercept`` unchanged."""
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    if len(present) == k:
        return coef, intercept
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate(
            [-intercept / 2, intercept / 2])
    full_coef = np.zeros((k, coef.shape[1]))
    full_bias = np.full(k, ABSENT_LOGIT)
    full_coef[present], full_bias[present] = coef, intercept
    return full_coef, full_bias


def fold_probe(classifier: nn.Module, coef: np.ndarray, intercept: np.ndarray,
               mean: np.ndarray, scale: np.ndarray) -> None:
    """Write ``standardise -> logistic regression`` into ``classifier`` (an ``nn.Linear``).

    Raises:
        ValueError: ``classifier`` is not a linear layer with a bias of the right shape.
    """
    coef = np.asarray(coef, np.float64) / np.asarray(scale, np.float64)
    bias = np.asarray(intercept, np.float64) - coef @ np.asarray(mean, np.float64)
    if coef.shape[0] == 1:  # binary: softmax([-z/2, z/2]) = sigmoid(z)
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    if (not isinstance(classifier, nn.Linear) or classifier.bias is None
            or tuple(classifier.weight.shape) != coef.shape):
        raise ValueError(f"cannot fold a {coef.shape[0]}x{coef.shape[1]} linear probe into "
                         f"{type(classifier).__name__} {getattr(classifier, 'weight', None)!r}"
                         " (need nn.Linear with a bias, same shape)")
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(coef))
        classifier.bias.copy_(torch.from_numpy(bias))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              *, select: str = "balanced_accuracy", balanced: bool = False,
              grid: tuple[float, ...] = C_GRID) -> dict[str, Any]:
    """Standardise, fit a logistic regression per ``C`` on train, choose ``C`` on validation.

    Returns:
        ``coef`` (``[K, D]``, ``K`` = 1 for two classes), ``intercept``, ``mean``, ``scale``
        (the train standardisation), ``C``, ``scores`` (validation metrics per ``C``),
        ``converged`` (lbfgs stopped before ``MAX_ITER`` at the chosen ``C``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    yv = torch.as_tensor(y_val)
    fits, scores, best = {}, [], None
    for c in grid:
        with warnings.catch_warnings():  # convergence is checked and reported for the C kept
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER,
                                    class_weight="balanced" if balanced else None)
            lr.fit(xt, y_train)
        val = metrics(torch.from_numpy(probe_logits(lr.coef_, lr.intercept_, xv)), yv)
        scores.append({"C": c, **val})
        fits[c] = lr
        if best is None or better(val, best[1], select):  # strict: ties keep the smaller C
            best = (c, val)
    c = best[0]
    lr = fits[c]
    return {"coef": lr.coef_, "intercept": lr.intercept_, "mean": scaler.mean_,
            "scale": scaler.scale_, "C": c, "scores": scores,
            "converged": bool(np.max(lr.n_iter_) < MAX_ITER)}


def _check(cfg: TrainConfig) -> None:
    """Settings a linear probe cannot honour, refused before any work."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--head linear runs in one process (features are extracted once, the "
                         "fit takes seconds); run it without torchrun")
    if cfg.resume:
        raise ValueError("--head linear has nothing to resume: a rerun reads the feature cache "
                         "and refits in seconds; drop --resume")
    if cfg.color_jitter or cfg.hed_jitter:
        raise ValueError("--head linear embeds each image once, without augmentation: drop "
                         "--color-jitter/--hed-jitter or use --head finetune")


def train_linear(cfg: TrainConfig) -> Path:
    """Fit a linear probe as ``cfg`` says (module docstring); returns the path of ``best.pt``.

    Writes ``best.pt``, ``config.yaml`` and ``done`` into ``cfg.out``.

    Raises:
        ValueError: A bad setting, ``out`` already holding a run, a backbone whose embedding
            the classifier layer does not see, unreadable images, or a class absent from train.
    """
    _check(cfg)
    out = Path(cfg.out)
    if (out / "done").exists() or (out / "last.pt").exists():  # a best.pt alone: a killed probe
        raise ValueError(f"{out} already holds a run; choose another --out")
    check_output(out, "folder")
    remove_stale_temps(out, older_than=0)
    torch.manual_seed(cfg.seed)  # a random (--no-pretrained) backbone is the same every run
    device = models.resolve_device(cfg.device)
    data = build_data(cfg, Dist(device=device))
    backbone = resolve_backbone(cfg.model, cfg.model_args,
                                offline=bool(cfg.weights) or not cfg.pretrained)
    rule = backbone.embedding or "cls"
    if rule != "cls":
        raise ValueError(f"--head linear with --model {cfg.model}: its embedding rule is {rule!r}"
                         ", which timm's classifier layer does not see (it sees the pooled "
                         "class token, rule 'cls'), so the probe cannot be folded into a member; "
                         "use --head finetune, or a backbone whose embedding is 'cls'")
    y = {name: np.array([data.classes.index(v) for v in rows[data.target]])
         for name, rows in (("train", data.train_rows), ("val", data.val_rows))}
    present = sorted(set(y["train"].tolist()))
    absent = [c for i, c in enumerate(data.classes) if i not in present]
    unseen_val = sorted({data.classes[i] for i in set(y["val"].tolist()) - set(present)})
    if len(present) < 2 or unseen_val:
        raise ValueError(f"--head linear: no train images of class(es) "
                         f"{', '.join(unseen_val or absent)}; a linear probe needs two classes "
                         "and cannot learn a class it never sees")
    if absent:  # e.g. eva's 4 BreakHis subtypes of the 8: the probe never predicts the others
        log.warning("--head linear: class(es) %s have no train images; their logit is %g "
                    "(probability ~0)", ", ".join(absent), ABSENT_LOGIT)
    model = models.create_model(backbone, len(data.classes), pretrained=cfg.pretrained,
                                weights=cfg.weights, drop_rate=cfg.drop_rate).eval()
    pre = models.model_preprocess(model, cfg.image_size)
    mode = input_mode(cfg, pre)  # tiles: an image's embedding is the mean of its tiles'
    cache = FeatureCache(cache_root(cfg.feature_cache), setting_key(
        backbone.timm_name, backbone.model_args, backbone_sha256(model), pre, data.stain_key,
        rule, mode.to_dict()))
    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    prep = Preparation(((pre, data.stain),), inputs=(mode,))
    feats = {name: extract(model, list(rows["path"]), prep, cache, rule=rule, device=device,
                           batch_size=cfg.batch_size, workers=workers)
             for name, rows in (("train", data.train_rows), ("val", data.val_rows))}
    cached = sum(f.cached for f in feats.values())
    extracted = sum(f.extracted for f in feats.values())
    log.info("features: %d cached, %d extracted (%s)", cached, extracted,
             cache.root or "cache off")
    model = model.cpu()
    index = {k: j for j, k in enumerate(present)}
    probe = fit_probe(feats["train"].x, np.array([index[v] for v in y["train"]]), feats["val"].x,
                      np.array([index[v] for v in y["val"]]), select=cfg.select,
                      balanced=cfg.balance != "none")
    coef, intercept = expand_probe(probe["coef"], probe["intercept"], present,
                                   len(data.classes))
    fold_probe(model.get_classifier(), coef, intercept, probe["mean"], probe["scale"])
    with torch.no_grad():  # what the saved member outputs on the validation embeddings
        logits = model.get_classifier()(torch.from_numpy(feats["val"].x))
    val = metrics(logits, torch.as_tensor(y["val"]))
    if not probe["converged"]:
        log.warning("lbfgs did not converge within %d iterations at C=%g", MAX_ITER, probe["C"])
    log.info("linear probe: C=%g chosen on val %s from %d values %g..%g; refit %s; val %s",
             probe["C"], cfg.select, len(C_GRID), C_GRID[0], C_GRID[-1], REFIT,
             " ".join(f"{k}={'n/a' if v is None else format(v, '.4f')}"
                      for k, v in val.items()))
    linear = {"C": probe["C"], "grid": list(C_GRID), "select": cfg.select,
              "scores": probe["scores"], "val": val, "solver": "lbfgs",
              "standardised": "folded into the classifier (train mean and std)",
              "class_weight": "balanced" if cfg.balance != "none" else None, "refit": REFIT,
              "converged": probe["converged"], "embedding": rule,
              "absent_classes": {"classes": absent, "logit": ABSENT_LOGIT} if absent else None,
              "features": {"cached": cached, "extracted": extracted,
                           "dim": int(feats["train"].x.shape[1]),
                           "cache": str(cache.root) if cache.root else None}}
    meta = models.member_meta(cfg.model, backbone.timm_name, data.classes, pre, task=cfg.task,
                              drop_rate=cfg.drop_rate, stain=data.stain_meta, config=asdict(cfg),
                              fingerprint=fingerprint(cfg), metrics=val, head="linear",
                              linear=linear, input=mode.to_dict(), **backbone.meta(),
                              **data.resolution)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best.pt", model, meta)
    resolved = {"timm_name": backbone.timm_name, "classes": list(data.classes),
                "input": mode.to_dict(),
                "device": str(device), "head": "linear", "C": probe["C"],
                "train_images": len(data.train_rows), "val_images": len(data.val_rows),
                "preprocess": pre.to_dict(), "features": linear["features"]}
    records.write_config({**asdict(cfg), "resolved": resolved}, out / "config.yaml")
    (out / "done").write_text(f"linear probe; C={probe['C']:g}; val {val}\n")
    return out / "best.pt"
