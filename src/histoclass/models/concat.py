"""The study's feature-concatenation ensemble: a small head on frozen members' pooled features.

Kalati et al. freeze the members, concatenate their global-pooled features and train
BatchNorm -> Dropout(0.2) -> Dense(128, ReLU) -> BatchNorm -> Dropout(0.2) -> Dense(32, ReLU)
-> BatchNorm -> Dropout(0.2) -> Dense(classes). Since the members are frozen their features
never change, so they are computed once and the head trains on the cached tensors in seconds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class ConcatHead(nn.Sequential):
    """The concatenation head; ``config`` rebuilds it (stored in the ensemble file).

    Args:
        in_features: Sum of the members' pooled feature widths.
        num_classes: Output logits.
        hidden: Widths of the hidden Dense+ReLU layers.
        dropout: Dropout before every Dense layer.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 32),
                 dropout: float = 0.2) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.BatchNorm1d(width), nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.BatchNorm1d(width), nn.Dropout(dropout), nn.Linear(width, num_classes)]
        super().__init__(*layers)
        self.config = {"in_features": int(in_features), "num_classes": int(num_classes),
                       "hidden": [int(h) for h in hidden], "dropout": float(dropout)}


def features_and_logits(model: nn.Module, x: torch.Tensor, features: bool = False
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A member's global-pooled features (when asked) and logits, in one pass."""
    if not features:
        return None, model(x)
    if not hasattr(model, "forward_head") or not hasattr(model, "get_classifier"):
        raise ValueError(f"{type(model).__name__} has no forward_features/forward_head (timm "
                         "models have them): it cannot be a member of a concat ensemble")
    f = model.forward_head(model.forward_features(x), pre_logits=True)
    return f, model.get_classifier()(f)


def _loss(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(head(x), y))


def fit_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    fit_idx: Sequence[int],
    stop_idx: Sequence[int],
    num_classes: int,
    *,
    seed: int = 0,
    max_epochs: int = 300,
    patience: int = 30,
    lr: float = 1e-3,
    batch_size: int = 32,
) -> tuple[ConcatHead, dict[str, float]]:
    """Train a :class:`ConcatHead` on ``fit_idx`` rows, early-stopped on ``stop_idx`` rows.

    Args:
        features: Cached concatenated features ``[N, F]`` (validation images only).
        targets: Class indices ``[N]``.
        fit_idx: Rows the weights are fitted on.
        stop_idx: Rows whose loss picks the epoch kept (the best one).
        num_classes: Output logits.
        seed: Initialisation and batch order.
        max_epochs: Upper bound on epochs.
        patience: Stop after this many epochs without a better stopping loss.
        lr: Adam learning rate.
        batch_size: Rows per step (a last batch of one row is dropped: BatchNorm needs two).

    Returns:
        The head (eval mode, best epoch's weights) and ``best_epoch``, ``stop_loss``,
        ``epochs`` run.
    """
    if len(fit_idx) < 2:
        raise ValueError(f"the concat head needs at least 2 fitting rows, got {len(fit_idx)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred rows: extra threads only add sync cost (60x here)
    try:
        return _fit(features, targets, list(fit_idx), list(stop_idx), num_classes, seed,
                    max_epochs, patience, lr, batch_size)
    finally:
        torch.set_num_threads(threads)


def _fit(features, targets, fit_idx, stop_idx, num_classes, seed, max_epochs, patience, lr,
         batch_size) -> tuple[ConcatHead, dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ConcatHead(features.shape[1], num_classes)
    xf, yf = features[fit_idx].float(), targets[fit_idx]
    xs, ys = features[stop_idx].float(), targets[stop_idx]
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state, best_epoch, epoch = float("inf"), None, 0, 0
    for epoch in range(1, max_epochs + 1):
        head.train()
        order = torch.randperm(len(xf), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 100003 + epoch * 1009 + start)  # dropout masks
                loss = nn.functional.cross_entropy(head(xf[idx]), yf[idx])
                opt.zero_grad()
                loss.backward()
            opt.step()
        stop = _loss(head, xs, ys)
        if stop < best - 1e-6:
            best, best_state, best_epoch = stop, copy.deepcopy(head.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    log.info("concat head: best stopping loss %.4f at epoch %d of %d", best, best_epoch, epoch)
    return head, {"best_epoch": best_epoch, "stop_loss": best, "epochs": epoch}
