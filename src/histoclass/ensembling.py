"""Build an ensemble from member checkpoints, fitting it on a manifest's validation split only.

Test rows are never read: only ``select(manifest, "val", fold)`` reaches the members. See
:mod:`histoclass.models.ensemble` for the rules and the file format and
:mod:`histoclass.models.ensemble_fit` for how weights, stacking and the concat head are fitted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from histoclass.models.ensemble import DEFAULT_REFER, METHODS, Ensemble, load_member

log = logging.getLogger(__name__)
PRESETS = ("v1", "v2", "all")


def preset_members(preset: str, runs: str | Path) -> list[Path]:
    """``runs/<name>/best.pt`` for the V1 family (B0-B4), the V2 family (B0-B3, S) or all ten."""
    from histoclass.models.members import V1_FAMILY, V2_FAMILY

    names = {"v1": V1_FAMILY, "v2": V2_FAMILY, "all": V1_FAMILY + V2_FAMILY}
    if preset not in names:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    paths = [Path(runs) / n / "best.pt" for n in names[preset]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"preset {preset}: member checkpoint(s) missing: "
                                f"{', '.join(missing)} (train them or list members explicitly)")
    return paths


def _names(paths: Sequence[Path], archs: Sequence[str]) -> list[str]:
    """Members are named by arch; a repeated arch gets its run folder (``runs/<run>/best.pt``)
    or file stem appended."""
    out: list[str] = []
    for p, a in zip(paths, archs, strict=True):
        where = p.parent.name if p.stem in ("best", "last") else p.stem
        name = a if archs.count(a) == 1 else f"{a}@{where}"
        while name in out:
            name += "+"
        out.append(name)
    return out


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
    device: str = "cpu",
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
        workers: Decoding processes.
        device: Torch device for the members.
    """
    from histoclass.predict import run

    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    paths = [Path(p) for p in members]
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(paths)}")
    loaded = [load_member(p, device=device) for p in paths]
    names = _names(paths, [m.name for m in loaded])
    loaded = [m._replace(name=n) for m, n in zip(loaded, names, strict=True)]
    base = Ensemble(loaded, "soft", refer_threshold=refer_threshold, member_paths=paths)
    base.to(device)
    if method in ("soft", "hard"):
        fit = {"manifest": str(manifest) if manifest else None, "fold": fold, "rows": 0}
        return Ensemble(loaded, method, refer_threshold=refer_threshold, member_paths=paths,
                        fit=fit).to(device)
    if manifest is None:
        raise ValueError(f"method {method!r} is fitted on a validation split: give --manifest")
    frame = _validation(manifest, fold, base)
    target_col = "label" if base.task == "binary" else "subtype"
    out = run(base, list(frame["path"]), batch_size=batch_size, workers=workers,
              features=method == "concat")
    if out.skipped:
        log.warning("fitting without %d unreadable validation image(s)", len(out.skipped))
    rows = frame.iloc[out.index].reset_index(drop=True)
    y = torch.tensor([base.classes.index(v) for v in rows[target_col]])
    from histoclass.models import ensemble_fit

    fit_rows, stop_rows, how = ensemble_fit.inner_split(list(rows["patient_id"]), y.tolist(),
                                                        inner_frac, seed)
    fit: dict[str, Any] = {
        "manifest": str(manifest), "fold": fold, "split": "val", "rows": len(rows),
        "skipped": len(out.skipped), "inner_split": how, "fit_rows": len(fit_rows),
        "stop_rows": len(stop_rows), "seed": seed,
        "paths": [str(p) for p in rows["path"]],  # exactly what was fitted on (audit trail)
    }
    kwargs: dict[str, Any] = {}
    if method == "weighted":
        kwargs["weights"] = ensemble_fit.fit_weights(out.members, y)
    elif method == "stack":
        from histoclass.models.ensemble import stack_features

        x = stack_features(out.members).double().numpy()
        kwargs["stack"] = ensemble_fit.fit_stack(x, y.numpy(), fit_rows, stop_rows,
                                                 len(base.classes))
    else:
        from histoclass.models.concat import fit_head

        head, info = fit_head(out.features, y, fit_rows, stop_rows, len(base.classes), seed=seed)
        fit.update(info)
        kwargs["head"] = head
    return Ensemble(loaded, method, refer_threshold=refer_threshold, member_paths=paths,
                    fit=fit, **kwargs).to(device)


def _validation(manifest: str | Path, fold: int | None, ens: Ensemble):
    from histoclass.data.manifest import read_manifest, select

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
