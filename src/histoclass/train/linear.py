"""A linear probe on a frozen backbone (``histoclass train --head linear``).

The backbone is never trained: it embeds every train and validation image once, in eval mode,
through the prediction path's preparation (stain, resize or tiles, normalise; no
augmentation), with the embeddings cached across runs (:mod:`histoclass.train.features`). A
logistic regression is fitted on them with ``C`` chosen as ``--probe-select`` says
(:mod:`histoclass.train.probe`): ``val`` fits on train and chooses on val, with no refit on
train + val, so the stored validation metrics are those of the saved member (optimistic only
by the choice of ``C``); ``cv`` chooses by patient-disjoint inner CV over train + val and
refits on both, and its stored metrics are out-of-fold. The temperature and the referral
threshold (``--calibrate``, ``--refer-risk``) are fitted on the same held-out logits.

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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from histoclass import models
from histoclass.calibration import calibrate_logits
from histoclass.data.files import check_output, remove_stale_temps
from histoclass.models.checkpoint import save_checkpoint
from histoclass.models.classifier import Preparation
from histoclass.models.sources import resolve_backbone
from histoclass.train import records
from histoclass.train.config import TrainConfig, fingerprint
from histoclass.train.data import build_data, input_mode
from histoclass.train.distributed import Dist
from histoclass.train.epoch import metrics
from histoclass.train.features import FeatureCache, cache_root, extract, setting_key
from histoclass.train.features import weights_sha256 as backbone_sha256
from histoclass.train.probe import (
    ABSENT_LOGIT,
    C_GRID,
    MAX_ITER,
    cv_probe,
    expand_probe,
    fit_probe,
    fold_probe,
)

log = logging.getLogger(__name__)
REFIT = "none: the head kept is the one fitted on the train split with the chosen C"
REFIT_CV = "train + val with the chosen C (--probe-select cv)"


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
    yi = {name: np.array([index[v] for v in y[name]]) for name in y}
    balanced = cfg.balance != "none"
    if cfg.probe_select == "cv":  # pooled train + val, patient-disjoint inner folds
        probe = cv_probe(np.concatenate([feats["train"].x, feats["val"].x]),
                         np.concatenate([yi["train"], yi["val"]]), np.concatenate(
                             [data.train_rows["patient_id"], data.val_rows["patient_id"]]
                         ).astype(str), select=cfg.select, balanced=balanced, grid=C_GRID,
                         seed=cfg.seed)
    else:
        probe = fit_probe(feats["train"].x, yi["train"], feats["val"].x, yi["val"],
                          select=cfg.select, balanced=balanced)
    coef, intercept = expand_probe(probe["coef"], probe["intercept"], present,
                                   len(data.classes))
    fold_probe(model.get_classifier(), coef, intercept, probe["mean"], probe["scale"])
    if cfg.probe_select == "cv":  # held-out logits of every train + val row, all classes
        held, held_y = np.full((len(probe["oof"]), len(data.classes)), ABSENT_LOGIT), \
            np.concatenate([y["train"], y["val"]])
        held[:, present] = probe["oof"]
        held_on = f"out-of-fold logits of train + val ({probe['inner']['folds']} inner folds)"
    else:
        with torch.no_grad():  # what the saved member outputs on the validation embeddings
            held = model.get_classifier()(torch.from_numpy(feats["val"].x)).double().numpy()
        held_y, held_on = y["val"], "val split"
    val = metrics(torch.from_numpy(held), torch.as_tensor(held_y))
    rec = calibrate_logits(held, held_y, cfg.calibrate, cfg.refer_risk, cfg.refer_delta)
    rec["calibration"]["fitted_on"] = held_on
    if not probe["converged"]:
        log.warning("lbfgs did not converge within %d iterations at C=%g", MAX_ITER, probe["C"])
    log.info("linear probe: C=%g chosen on %s (%s) from %d values %g..%g; val %s; T=%.4f",
             probe["C"], held_on, cfg.select, len(C_GRID), C_GRID[0], C_GRID[-1],
             " ".join(f"{k}={'n/a' if v is None else format(v, '.4f')}"
                      for k, v in val.items()), rec["temperature"])
    linear = {"C": probe["C"], "grid": list(C_GRID), "select": cfg.select,
              "scores": probe["scores"], "val": val, "solver": "lbfgs",
              "probe_select": cfg.probe_select, "chosen_on": held_on,
              "inner": probe.get("inner"),
              "trained_on": ["train", "val"] if cfg.probe_select == "cv" else ["train"],
              "standardised": "folded into the classifier (train mean and std)",
              "class_weight": "balanced" if balanced else None,
              "refit": REFIT_CV if cfg.probe_select == "cv" else REFIT,
              "converged": probe["converged"], "embedding": rule,
              "absent_classes": {"classes": absent, "logit": ABSENT_LOGIT} if absent else None,
              "features": {"cached": cached, "extracted": extracted,
                           "dim": int(feats["train"].x.shape[1]),
                           "cache": str(cache.root) if cache.root else None}}
    meta = models.member_meta(cfg.model, backbone.timm_name, data.classes, pre, task=cfg.task,
                              drop_rate=cfg.drop_rate, stain=data.stain_meta, config=asdict(cfg),
                              fingerprint=fingerprint(cfg), metrics=val, head="linear",
                              linear=linear, input=mode.to_dict(), **backbone.meta(),
                              **data.resolution, **rec)
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
