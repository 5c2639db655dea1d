"""The PyTorch :class:`Ensemble` (a lone member is an ensemble of one) and the one loader.

:func:`load_model_file` reads a member checkpoint *or* an ensemble file and returns an
:class:`Ensemble`, which implements :class:`~histoclass.models.classifier.Classifier`; predict,
explain, export and serve use nothing else. Its members are :class:`Member` tuples ``(name,
model, meta, preprocess, stain)``, models in eval mode. The combining rules and the
disagreement measure are in :mod:`histoclass.models.voting`; the concatenation head in
:mod:`histoclass.models.concat`.

Ensemble file: ``torch.save`` of plain types and tensors (read with ``weights_only=True``):
``format`` ``histoclass-ensemble``, ``version``, ``kind`` ``ensemble``, ``method``, ``classes``,
``task``, ``members`` (``name``, ``path`` relative to the ensemble file when possible,
``abs_path``, ``sha256``, ``arch``), ``weights``, ``stack`` (``coef``, ``intercept`` as lists),
``head`` (state dict) and ``head_config``, ``refer_threshold``, ``fit`` (what it was fitted on),
and (version 2) the ensemble's own ``temperature``, ``calibration`` record and ``refer_risk`` rule
(:func:`histoclass.calibration.calibrate_logits` on its combined validation probabilities).
A member file that changed or is missing is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from histoclass._version import __version__
from histoclass.models.checkpoint import (
    CheckpointError,
    atomic_save,
    check_checkpoint,
    check_ensemble_numbers,
    ensemble_calibration,
    file_sha256,
    load_file,
    load_reason,
    member_file,
)
from histoclass.models.classifier import Preparation, Scores
from histoclass.models.concat import ConcatHead
from histoclass.models.members import Member, load_member, member_names
from histoclass.models.published import published_folder, read_published
from histoclass.models.resolution import Resolution, agreed, of_meta
from histoclass.models.tiles import Tiles, collate_tiles, head_of, input_of, member_logits
from histoclass.models.tiles import views as tile_views
from histoclass.models.voting import (
    METHODS,
    Output,
    combine,
    dihedral,
    disagreement,
    fuse,
    normalised_weights,
    stack_features,
    temper,
)

__all__ = [
    "DEFAULT_REFER", "METHODS", "Ensemble", "Member", "Output", "combine", "dihedral",
    "disagreement", "ensemble_of", "load_member", "load_model_file", "normalised_weights",
    "stack_features",
]
FORMAT = "histoclass-ensemble"
VERSION = 2  # 2: the ensemble's own temperature and referral rule
DEFAULT_REFER = 0.25


class Ensemble:
    """Members plus a rule that combines them (see :mod:`histoclass.models.voting`)."""

    def __init__(self, members: Sequence[Member], method: str = "soft", *,
                 weights: Sequence[float] | None = None, stack: dict[str, Any] | None = None,
                 head: ConcatHead | None = None, refer_threshold: float = DEFAULT_REFER,
                 member_paths: Sequence[str | Path] = (), fit: dict[str, Any] | None = None,
                 temperature: float = 1.0, calibration: dict[str, Any] | None = None,
                 refer_risk: dict[str, Any] | None = None):
        if method not in (*METHODS, "single"):
            raise ValueError(f"unknown ensemble method {method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for m in members[1:]:
            if list(m.meta["classes"]) != list(first.meta["classes"]):
                raise ValueError(f"member {m.name} has classes {m.meta['classes']} but member "
                                 f"{first.name} has {first.meta['classes']}; they must agree")
        needs = {"weighted": weights, "stack": stack, "concat": head}
        if method in needs and needs[method] is None:
            raise ValueError(f"method {method!r} needs fitted parameters (use fit_ensemble)")
        self.members, self.method = list(members), method
        self.classes: list[str] = list(first.meta["classes"])
        self.task: str = first.meta.get("task", "binary")
        self.weights = list(weights) if weights is not None else None
        self.stack, self.head = stack, head
        self.refer_threshold = float(refer_threshold)
        self.member_paths = [str(p) for p in member_paths]
        self.fit = fit or {}
        # The ensemble's own calibration (a lone member's lives in its metadata).
        self.own_temperature = float(temperature) if self.is_ensemble else 1.0
        self.calibration, self.refer_risk = calibration, refer_risk
        self.device = torch.device("cpu")

    # -- the Classifier interface ---------------------------------------------------------------
    @property
    def member_names(self) -> list[str]:
        """Member names, in member order."""
        return [m.name for m in self.members]

    @property
    def is_ensemble(self) -> bool:
        """False for a lone member checkpoint."""
        return self.method != "single"

    @property
    def preparation(self) -> Preparation:
        """Each member's stain -> resize (or tiles) -> normalise (members differ in input)."""
        return Preparation(tuple((m.preprocess, m.stain) for m in self.members),
                           inputs=tuple(input_of(m.meta) for m in self.members))

    @property
    def resolution(self) -> Resolution | None:
        """The members' shared training resolution (see :func:`models.resolution.agreed`)."""
        return agreed([(m.name, of_meta(m.meta)) for m in self.members], "ensemble"
                      if self.is_ensemble else self.members[0].name)

    @property
    def temperature(self) -> float:
        """The temperature already in :attr:`Scores.proba`: the ensemble's own (1 when not
        fitted), or a lone member's."""
        return self.own_temperature if self.is_ensemble else \
            float(self.members[0].meta.get("temperature", 1.0))

    @property
    def confidence_threshold(self) -> float | None:
        """Refer below this top probability (the ensemble's, or a lone member's,
        ``--refer-risk`` threshold)."""
        rule = self.refer_risk if self.is_ensemble else self.members[0].meta.get("refer_risk")
        return (rule or {}).get("threshold")

    def describe(self) -> dict[str, Any]:
        """Members, their preprocessing and stain normalisers, in plain types."""
        return {"method": self.method, "classes": self.classes, "task": self.task,
                "members": [{"name": m.name, "arch": m.meta.get("arch", ""),
                             "preprocess": m.preprocess.to_dict(),
                             "stain": m.meta.get("stain"),
                             "input": input_of(m.meta).to_dict(),
                             "resolution": (r.to_dict() if (r := of_meta(m.meta)) else None)}
                            for m in self.members]}

    def predict_prepared(self, items: Sequence[list[torch.Tensor]], tta: bool = False) -> Scores:
        """Scores for items of :attr:`preparation`; ``tta`` averages the 8 dihedral views."""
        out = self.predict_proba(self.collate(items), tta=tta)
        return Scores(*(t.cpu().numpy() for t in out))

    def predict_images(self, images: Sequence[np.ndarray | Image.Image], tta: bool = False
                       ) -> Scores:
        """Scores for decoded RGB images (``HxWx3`` uint8 arrays or PIL images)."""
        prepare = self.preparation
        return self.predict_prepared([prepare(img) for img in images], tta=tta)

    # -- PyTorch ----------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> Ensemble:
        """Move every network to ``device``."""
        self.device = torch.device(device)
        for m in self.members:
            m.model.to(self.device)
        if self.head is not None:
            self.head.to(self.device)
        return self

    def collate(self, items: Sequence[list[torch.Tensor]]) -> list[torch.Tensor | Tiles]:
        """Items of :attr:`preparation` as one ``[N, 3, H, W]`` batch per member (a
        :class:`~histoclass.models.tiles.Tiles` of all the images' tiles for a tiles member)."""
        return [collate_tiles([item[i] for item in items]) if input_of(m.meta).tiles
                else torch.stack([item[i] for item in items])
                for i, m in enumerate(self.members)]

    def prepare(self, image: Any) -> list[torch.Tensor]:
        """One normalised ``3xHxW`` input per member for one RGB image (PIL or array)."""
        return self.preparation(image)

    @torch.no_grad()
    def forward(self, inputs: Sequence[torch.Tensor | Tiles], features: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Members' probabilities ``[M, N, C]`` (after their temperatures) and pooled features;
        a tiles member's are one row per image (:func:`~histoclass.models.tiles.member_logits`)."""
        if len(inputs) != len(self.members):
            raise ValueError(f"{len(inputs)} inputs for {len(self.members)} members")
        probs, feats = [], []
        for m, x in zip(self.members, inputs, strict=True):
            f, logits = member_logits(m.model, x.to(self.device), features, head_of(m.meta))
            # float64: a small T must not underflow what raw.p_ is recovered from
            probs.append((logits.double() / m.meta.get("temperature", 1.0)).softmax(-1))
            feats.append(f)
        return torch.stack(probs), feats

    @torch.no_grad()
    def predict_proba(self, inputs: Sequence[torch.Tensor | Tiles], tta: bool = False
                      ) -> Output:
        """Combine the members on one batch per member; ``tta`` averages the 8 dihedral views."""
        views = [tile_views(x, tta) for x in inputs]
        members, head_p = 0.0, 0.0
        for v in range(len(views[0])):
            p, feats = self.forward([vs[v] for vs in views], features=self.method == "concat")
            members = members + p
            if self.head is not None:  # the head is averaged over views, not its inputs
                head_p = head_p + fuse(self.method, p, feats, head=self.head.eval())[0]
        members = members / len(views[0])
        if self.head is not None:
            proba = head_p / len(views[0])
            pred = proba.argmax(-1)
        else:
            proba, pred = combine(self.method, members, weights=self.weights, stack=self.stack)
        return Output(temper(proba.double(), self.own_temperature), pred, members,
                      disagreement(self.method, members, pred))

    # -- the ensemble file ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the ensemble file (members are referenced by path and sha256, not copied)."""
        if len(self.member_paths) != len(self.members):
            raise ValueError("an ensemble is saved with its members' file paths")
        path = Path(path)
        entries = []
        for m, p in zip(self.members, self.member_paths, strict=True):
            p = Path(p).resolve()
            try:
                rel = os.path.relpath(p, path.resolve().parent)
            except ValueError:  # another drive on Windows
                rel = str(p)
            entries.append({"name": m.name, "path": Path(rel).as_posix(), "abs_path": str(p),
                            "sha256": file_sha256(p), "arch": m.meta.get("arch", "")})
        obj = {
            "format": FORMAT, "version": VERSION, "kind": "ensemble", "method": self.method,
            "classes": self.classes, "task": self.task, "members": entries,
            "weights": self.weights, "stack": self.stack,
            "head": None if self.head is None else {k: v.detach().cpu().contiguous()
                                                    for k, v in self.head.state_dict().items()},
            "head_config": None if self.head is None else self.head.config,
            "refer_threshold": self.refer_threshold, "fit": self.fit,
            "temperature": self.own_temperature, "calibration": self.calibration,
            "refer_risk": self.refer_risk, "histoclass_version": __version__,
        }
        return atomic_save(obj, path)


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load a member checkpoint (as an ensemble of one), an ensemble file or a published
    folder (``local-dir:DIR``, ``hf-hub:ORG/NAME``; :mod:`histoclass.models.published`)."""
    if (folder := published_folder(path)) is not None:
        parts, kwargs = read_published(folder, device)
        return Ensemble([Member(*p) for p in parts], **kwargs).to(device)
    path = Path(path)
    obj = load_file(path, "model file")
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        # Read once: a member checkpoint is checked and rebuilt from what was just loaded.
        member = load_member(path, device=device, checkpoint=check_checkpoint(obj, path))
        return Ensemble([member], "single", member_paths=[path]).to(device)
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: ensemble format version {obj['version']} is newer than "
                              f"this histoclass understands ({VERSION}); upgrade histoclass")
    entries = obj.get("members")
    if not (isinstance(entries, list) and entries and obj.get("method") in METHODS and all(
            isinstance(e, dict) and {"name", "path", "abs_path", "sha256"} <= set(e)
            for e in entries)):
        raise CheckpointError(f"{path}: ensemble file with malformed members or method "
                              f"{obj.get('method')!r} (valid: {', '.join(METHODS)})")
    files = [member_file(path, e) for e in entries]
    members = [load_member(f, e["name"], device) for f, e in zip(files, entries, strict=True)]
    check_ensemble_numbers(obj, path)
    calibrated = ensemble_calibration(obj, path)
    head = None
    if obj.get("head") is not None:
        try:
            head = ConcatHead(**obj["head_config"]).eval()
            head.load_state_dict(obj["head"])
        except (TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: concat head does not load ({load_reason(exc)})"
                                  ) from None
    return Ensemble(members, obj["method"], weights=obj.get("weights"), stack=obj.get("stack"),
                    head=head, refer_threshold=obj.get("refer_threshold", DEFAULT_REFER),
                    member_paths=files, fit=obj.get("fit"), **calibrated).to(device)


def ensemble_of(members: Sequence[Member], paths: Sequence[str | Path],
                weights: Sequence[float] | None = None, *,
                refer_threshold: float = DEFAULT_REFER) -> Ensemble:
    """Members of the files ``paths`` combined without fitting: ``soft``, or ``weighted`` by
    :func:`normalised_weights`. Members are renamed by :func:`member_names` (their arch, with
    the run folder when an arch repeats)."""
    names = member_names(paths, [m.meta.get("arch", m.name) for m in members])
    members = [m._replace(name=n) for m, n in zip(members, names, strict=True)]
    w = None if weights is None else normalised_weights(weights, len(members))
    return Ensemble(members, "soft" if w is None else "weighted", weights=w,
                    refer_threshold=refer_threshold, member_paths=paths)
