"""Voting rules on members' probabilities, member disagreement, and the 8 TTA views.

Pure tensor functions. Rules (``members`` are the members' softmax probabilities ``[M, N, C]``):
``soft`` unweighted mean; ``weighted`` weighted mean (non-negative weights summing to 1, fitted
on validation); ``hard`` majority vote, ``proba`` is the vote share and a tie is broken by the
soft average among the tied classes; ``stack`` logistic regression on the members'
probabilities (``p_malignant`` per member for two classes, every class otherwise); ``concat`` a
small head on the frozen members' concatenated pooled features (:mod:`histoclass.models.concat`).

Disagreement: ``hard``: share of members voting against the result; otherwise the standard
deviation of the members' ``p_malignant`` (two classes) or their mean total-variation distance
from the mean distribution (more classes). ``refer`` flags disagreement above the ensemble's
``refer_threshold``.

An ensemble's own temperature ``T`` (fitted on validation by
:func:`histoclass.train.ensembles.fit_ensemble`) rescales the combined probabilities as
``softmax(log(p) / T)`` (:func:`temper`): the argmax never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

METHODS = ("soft", "weighted", "hard", "stack", "concat")
HARD_EPS = 1e-3


class Output(NamedTuple):
    """What :meth:`Ensemble.predict_proba` returns for a batch of N images (tensors)."""

    proba: torch.Tensor  # [N, C]
    pred: torch.Tensor  # [N] class index
    members: torch.Tensor  # [M, N, C]
    disagreement: torch.Tensor  # [N]


def combine(method: str, members: torch.Tensor, *, weights: Sequence[float] | None = None,
            stack: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a voting rule to members' probabilities ``[M, N, C]``; returns ``(proba, pred)``."""
    soft = members.mean(0)
    if method in ("soft", "single"):
        proba = soft
    elif method == "weighted":
        w = torch.as_tensor(weights, dtype=members.dtype, device=members.device)
        proba = torch.einsum("m,mnc->nc", w, members)
    elif method == "hard":
        votes = nn.functional.one_hot(members.argmax(-1), members.shape[-1]).sum(0)
        tied = votes == votes.max(-1, keepdim=True).values
        pred = soft.masked_fill(~tied, -1.0).argmax(-1)  # tie: best soft average
        # The vote share, with the soft average folded in at weight HARD_EPS (< one vote), is
        # still a distribution, orders images by votes first, and puts a tie on the side the
        # tie-break chose: thresholding it at 0.5 agrees with ``pred``, so evaluation and AUC
        # need no special case for voting.
        proba = (votes.to(members.dtype) + HARD_EPS * soft) / (members.shape[0] + HARD_EPS)
        return proba, pred
    elif method == "stack":
        x = stack_features(members)
        coef = torch.as_tensor(stack["coef"], dtype=x.dtype, device=x.device)
        z = x @ coef.T + torch.as_tensor(stack["intercept"], dtype=x.dtype, device=x.device)
        if z.shape[1] == 1:  # sklearn's binary model: one logit for the second class
            p1 = torch.sigmoid(z[:, 0])
            proba = torch.stack([1 - p1, p1], 1)
        else:
            proba = z.softmax(-1)
    else:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    return proba, proba.argmax(-1)


def fuse(method: str, members: torch.Tensor, feats: Sequence[torch.Tensor] = (), *,
         weights: Sequence[float] | None = None, stack: dict[str, Any] | None = None,
         head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proba, pred)`` of any method before the ensemble's temperature: :func:`combine`, or
    the concatenation ``head`` on the members' pooled ``feats`` (one home for PyTorch, the
    ONNX graph and the fitting on validation)."""
    if head is None:
        return combine(method, members, weights=weights, stack=stack)
    proba = head(torch.cat(list(feats), 1)).float().softmax(-1)
    return proba, proba.argmax(-1)


def temper(proba: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log(proba) / T)``: the ensemble's temperature on its combined probabilities
    (``proba`` itself when ``T = 1``; clamped so a zero stays a finite logit)."""
    if temperature == 1.0:
        return proba
    return (proba.clamp_min(torch.finfo(proba.dtype).tiny).log() / temperature).softmax(-1)


def stack_features(members: torch.Tensor) -> torch.Tensor:
    """Stacking inputs ``[N, F]``: each member's ``p_<class 1>`` (2 classes) or all classes."""
    if members.shape[-1] == 2:
        return members[:, :, 1].T.contiguous()
    return members.permute(1, 0, 2).reshape(members.shape[1], -1)


def disagreement(method: str, members: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per-image member disagreement (see the module docstring)."""
    if members.shape[0] == 1:
        return torch.zeros(members.shape[1], dtype=members.dtype, device=members.device)
    if method == "hard":
        return (members.argmax(-1) != pred).to(members.dtype).mean(0)
    if members.shape[-1] == 2:
        return members[:, :, 1].std(0, correction=0)
    return 0.5 * (members - members.mean(0)).abs().sum(-1).mean(0)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90-degree rotations of a ``[N, 3, H, W]`` batch."""
    views = [torch.rot90(x, k, (2, 3)) for k in range(4)]
    return views + [v.flip(3) for v in views]


def normalised_weights(weights: Sequence[float], n: int) -> list[float]:
    """``weights`` scaled to sum 1.

    Raises:
        ValueError: Not ``n`` weights, or weights that are negative or sum to zero.
    """
    w = np.asarray(weights, dtype=float)
    if len(w) != n:
        raise ValueError(f"{len(w)} weight(s) for {n} model(s); give one weight per checkpoint")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {w.tolist()}")
    return (w / w.sum()).tolist()
