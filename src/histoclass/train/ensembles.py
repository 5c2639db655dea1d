"""Build an ensemble from member checkpoints, fitting it on a manifest's validation split only.

Test rows are never read: only ``select(manifest, "val", fold)`` reaches the members. See
:mod:`histoclass.models.voting` for the rules, :mod:`histoclass.models.ensemble` for the file
format and :mod:`histoclass.models.fit` for how weights, stacking and the concat head are fitted.

Every method then gets its own temperature and ``--refer-risk`` rule
(:func:`histoclass.calibration.calibrate_logits` on ``log`` of its combined validation
probabilities): ``soft``/``weighted`` on every validation image; ``stack``/``concat`` on the inner
stop rows only, the ones their parameters were not fitted on; ``hard`` fits no temperature (a
vote share is a count of members, not a probability to rescale) but may state a referral rule on
its vote share. None is fitted when a member was trained on the validation split
(``--probe-select cv``: in-sample there) or, for soft/hard, without a manifest; the record says
why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histoclass.calibration import calibrate_logits
from histoclass.models import fit as fitting
from histoclass.models.concat import fit_head
from histoclass.models.ensemble import (
    DEFAULT_REFER,
    METHODS,
    Ensemble,
    ensemble_of,
    load_member,
    stack_features,
)
from histoclass.models.factory import resolve_device
from histoclass.models.members import FAMILIES
from histoclass.models.voting import fuse
from histoclass.predict import prepared_batches

log = logging.getLogger(__name__)


def preset_members(preset: str, runs: str | Path) -> list[Path]:
    """``runs/<name>/best.pt`` for the V1 family (B0-B4), the V2 family (B0-B3, S) or all ten."""
    if preset not in FAMILIES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(FAMILIES)}")
    paths = [Path(runs) / n / "best.pt" for n in FAMILIES[preset]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"preset {preset}: member checkpoint(s) missing: "
                                f"{', '.join(missing)} (train them or list members explicitly)")
    return paths


def fit_ensemble(
    members: Sequence[str | Path],
    method: str,
    manifest: str | Path | None = None,
    *,
    fold: int | None = None,
    refer_threshold: float = DEFAULT_REFER,
    seed: int = 0,
    inner_frac: float = 0.3,
    batch_size: int = 16,
    workers: int = 0,
    device: str | torch.device = "cpu",
    calibrate: str = "temperature",
    refer_risk: float | None = None,
    refer_delta: float = 0.1,
) -> Ensemble:
    """Load members and fit ``method`` on the validation split of ``manifest``.

    Args:
        members: Member checkpoint files.
        method: One of ``soft``, ``weighted``, ``hard``, ``stack``, ``concat``.
        manifest: Split manifest; needed by the fitted methods (validation rows only are read).
        fold: Fold of a k-fold manifest.
        refer_threshold: Disagreement above which an image is flagged ``refer``.
        seed: Inner fit/stop split and head initialisation.
        inner_frac: Share of validation patients kept aside for stopping/selection.
        batch_size: Images per forward pass.
        workers: Decoding threads.
        device: Torch device for the members.
        calibrate: ``temperature`` (fit the ensemble's own ``T`` on validation) or ``none``.
        refer_risk: Target error among accepted images: the confidence threshold of
            :func:`~histoclass.calibration.choose_refer_threshold`, stored in the file.
        refer_delta: Allowed probability that the stated error bound is wrong.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    paths = [Path(p) for p in members]
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(paths)}")
    device = resolve_device(device)
    base = ensemble_of([load_member(p, device=device) for p in paths], paths,
                       refer_threshold=refer_threshold).to(device)

    if calibrate not in ("temperature", "none"):
        raise ValueError(f"calibration {calibrate!r}: choose one of temperature, none")
    if refer_risk is not None and not 0 < refer_risk < 1:
        raise ValueError(f"--refer-risk {refer_risk}: must be in (0, 1)")
    cal = {"method": calibrate, "risk": refer_risk, "delta": refer_delta}

    def make(fit: dict[str, Any], **params: Any) -> Ensemble:
        return Ensemble(base.members, method, refer_threshold=refer_threshold,
                        member_paths=paths, fit=fit, **params).to(device)

    seen = trained_on_val(base)
    if method in ("soft", "hard"):
        fit0 = {"manifest": str(manifest) if manifest else None, "fold": fold, "rows": 0}
        if manifest is None and refer_risk is not None:
            raise ValueError("--refer-risk is chosen on a validation split: give --manifest")
        why = (f"member(s) {', '.join(seen)} were trained on the validation split "
               "(--probe-select cv): the ensemble's outputs there are in-sample" if seen
               else "calibration none" if calibrate == "none" and refer_risk is None
               else "no --manifest: no validation split to fit on" if manifest is None else None)
        if why is None:  # soft/hard read val only to calibrate: without it they still work
            try:
                frame = _validation(manifest, fold, base, fitted=False)
                index, probs, _, skipped = member_outputs(base, list(frame["path"]), False,
                                                          batch_size, workers)
            except ValueError as exc:
                if refer_risk is not None:
                    raise
                why = str(exc)
        if why is not None:
            return make(fit0, **_not_fitted(why, cal))
        y = _targets(base, frame.iloc[index])
        return _calibrated(make(fit0), probs, None, y, range(len(y)), "val split", cal)
    if manifest is None:
        raise ValueError(f"method {method!r} is fitted on a validation split: give --manifest")
    frame = _validation(manifest, fold, base)
    index, probs, feats, skipped = member_outputs(base, list(frame["path"]), method == "concat",
                                                  batch_size, workers)
    if skipped:
        log.warning("fitting without %d unreadable validation image(s)", len(skipped))
    rows = frame.iloc[index].reset_index(drop=True)
    y = _targets(base, rows)
    fit_rows, stop_rows, how = fitting.inner_split(list(rows["patient_id"]), y.tolist(),
                                                   inner_frac, seed)
    fit: dict[str, Any] = {
        "manifest": str(manifest), "fold": fold, "split": "val", "rows": len(rows),
        "skipped": len(skipped), "inner_split": how, "fit_rows": len(fit_rows),
        "stop_rows": len(stop_rows), "seed": seed,
        "paths": [str(p) for p in rows["path"]],  # exactly what was fitted on (audit trail)
    }
    if method == "weighted":
        ens = make(fit, weights=fitting.fit_weights(probs, y))
        return _calibrated(ens, probs, None, y, range(len(y)),
                           "val split (the rows that fitted the weights)", cal)
    if method == "stack":
        x = stack_features(probs).double().numpy()
        ens = make(fit, stack=fitting.fit_stack(x, y.numpy(), fit_rows, stop_rows,
                                                len(base.classes)))
    else:
        head, info = fit_head(feats, y, fit_rows, stop_rows, len(base.classes), seed=seed)
        ens = make({**fit, **info}, head=head)
    return _calibrated(ens, probs, feats, y, stop_rows, f"val stop rows (the {method} "
                       f"parameters were fitted on the other {len(fit_rows)})", cal)


def _targets(ens: Ensemble, rows: pd.DataFrame) -> torch.Tensor:
    col = "label" if ens.task == "binary" else "subtype"
    return torch.tensor([ens.classes.index(v) for v in rows[col]])


def _not_fitted(why: str, cal: dict[str, Any]) -> dict[str, Any]:
    """Ensemble keywords for ``T = 1`` and no referral threshold, saying ``why``."""
    if cal["method"] == "temperature" or cal["risk"] is not None:
        log.warning("ensemble not calibrated: %s", why)
    rule = None if cal["risk"] is None else {
        "alpha": cal["risk"], "delta": cal["delta"], "threshold": None, "reason": why}
    return {"temperature": 1.0, "calibration": {"method": cal["method"], "images": 0,
                                                "reason": why}, "refer_risk": rule}


def _calibrated(ens: Ensemble, probs: torch.Tensor, feats: torch.Tensor | None,
                y: torch.Tensor, rows: Sequence[int], on: str, cal: dict[str, Any]) -> Ensemble:
    """``ens`` with its own temperature and referral rule fitted on ``rows`` of its combined
    validation probabilities (``log`` of them as logits: ``softmax(log(p) / T)``)."""
    rows, dev = list(rows), ens.device
    with torch.no_grad():
        proba, _ = fuse(ens.method, probs[:, rows].to(dev),
                        [] if feats is None else [feats[rows].to(dev)], weights=ens.weights,
                        stack=ens.stack, head=None if ens.head is None else ens.head.eval())
    proba = proba.double().cpu().numpy()
    finite = np.isfinite(proba).all(axis=1)
    if not finite.all():  # one NaN row would make every temperature's NLL NaN
        log.warning("calibrating without %d validation image(s) whose ensemble output is "
                    "NaN/inf", int((~finite).sum()))
    z = np.log(np.clip(proba[finite], np.finfo(float).tiny, None))  # as voting.temper
    method = "none" if ens.method == "hard" else cal["method"]
    rec = calibrate_logits(z, y[rows].numpy()[finite], method, cal["risk"], cal["delta"])
    rec["calibration"].update(method=cal["method"], fitted_on=f"{on}: {len(z)} image(s)")
    if ens.method == "hard" and cal["method"] == "temperature":
        rec["calibration"]["reason"] = ("hard voting: a vote share is a count of members, not a "
                                        "probability; no temperature fitted")
    ens.own_temperature = rec["temperature"]
    ens.calibration, ens.refer_risk = rec["calibration"], rec["refer_risk"]
    c = rec["calibration"]
    log.info("%s ensemble: temperature %.4f %s%s", ens.method, ens.own_temperature,
             f"(not fitted: {c['reason']})" if c.get("reason") else f"fitted on {c['fitted_on']}",
             "" if rec["refer_risk"] is None else
             f"; refer below confidence {rec['refer_risk']['threshold']}")
    return ens


def member_outputs(ens: Ensemble, paths: list[str], features: bool, batch_size: int = 16,
                   workers: int = 0
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor | None, list[tuple[str, str]]]:
    """Members' probabilities ``[M, N, C]`` (and concatenated pooled features ``[N, F]``) on
    the readable ``paths``, with their row indices and the skipped files."""
    index, probs, feats, skipped = [], [], [], []
    for rows, items, bad in prepared_batches(paths, ens.preparation, batch_size, workers):
        skipped += bad
        if not rows:
            continue
        p, f = ens.forward(ens.collate(items), features=features)
        index += rows
        probs.append(p.cpu())
        if features:
            feats.append(torch.cat(f, 1).cpu())
    if not index:
        raise ValueError(f"none of the {len(paths)} validation image(s) could be read; "
                         "an ensemble cannot be fitted")
    return index, torch.cat(probs, 1), torch.cat(feats) if features else None, skipped


def trained_on_val(ens: Ensemble) -> list[str]:
    """Names of members whose training included the validation split (a linear probe with
    ``--probe-select cv``): their validation outputs are in-sample, nothing to fit on."""
    return [m.name for m in ens.members
            if "val" in ((m.meta.get("linear") or {}).get("trained_on") or [])]


def _validation(manifest: str | Path, fold: int | None, ens: Ensemble, fitted: bool = True
                ) -> pd.DataFrame:
    from histoclass.data.manifest import read_manifest, select

    seen = trained_on_val(ens)
    if seen and fitted:
        raise ValueError(f"member(s) {', '.join(seen)} were trained on the validation split "
                         "(--probe-select cv), so their validation outputs are in-sample and "
                         "cannot fit an ensemble; use --method soft or hard, or members "
                         "trained with --probe-select val")

    frame = select(read_manifest(manifest), "val", fold)
    if frame.empty:
        raise ValueError(f"{manifest}: no validation rows" + (f" in fold {fold}" if fold else "")
                         + "; ensembles are fitted on the validation split only")
    col = "label" if ens.task == "binary" else "subtype"
    bad = sorted(set(frame[col]) - set(ens.classes))
    if bad:
        raise ValueError(f"{manifest}: validation {col} value(s) {bad} not among the members' "
                         f"classes {ens.classes}")
    return frame
