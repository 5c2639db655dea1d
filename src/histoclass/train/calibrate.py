"""Post-training calibration of a member: temperature (and referral rule) fitted on the
validation split's logits of ``best.pt`` and stored in its metadata.

Only the validation split is used (never test); the weights are unchanged, so ``--resume``
allows ``--calibrate``/``--refer-risk`` to change.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from histoclass.calibration import calibrate_logits
from histoclass.models.checkpoint import read_checkpoint, save_checkpoint
from histoclass.train.config import TrainConfig
from histoclass.train.data import RunData
from histoclass.train.distributed import Dist, gather
from histoclass.train.epoch import collect_logits

log = logging.getLogger(__name__)


def calibrate_best(best: Path, model: nn.Module, data: RunData, cfg: TrainConfig, d: Dist,
                   amp: torch.dtype | None = None) -> dict | None:
    """Fit the calibration of ``best`` (loaded into ``model``) on ``data.val_loader`` and
    rewrite ``best`` with ``meta["temperature"]``, ``meta["calibration"]`` and
    ``meta["refer_risk"]``; returns the record (``None`` off the main process)."""
    gather(None, d)  # a barrier: under torchrun only the main process wrote best.pt
    ckpt = read_checkpoint(best)
    model.load_state_dict(ckpt["state_dict"])
    logits, targets = collect_logits(model, data.val_loader, d, amp, cfg.channels_last)
    if not d.main:
        return None
    rec = calibrate_logits(logits.numpy(), targets.numpy(), cfg.calibrate, cfg.refer_risk,
                           cfg.refer_delta)
    c = rec["calibration"]
    if "nll_after" in c:
        log.info("calibration T=%.4f on %d val images: NLL %.4f -> %.4f, ECE %.4f -> %.4f",
                 rec["temperature"], c["images"], c["nll_before"], c["nll_after"],
                 c["ece_before"] or 0.0, c["ece_after"] or 0.0)
    rule = rec["refer_risk"]
    if rule is not None and rule["threshold"] is None:
        log.warning("--refer-risk %g: %s; no referral threshold stored", rule["alpha"],
                    rule["reason"])
    elif rule is not None:
        log.info("refer below confidence %.4f: val error bound %.4f <= %g, %d/%d accepted",
                 rule["threshold"], rule["upper"], rule["alpha"], rule["accepted"],
                 rule["images"])
    save_checkpoint(best, model, {**ckpt["meta"], **rec})
    return rec
