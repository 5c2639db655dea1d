"""Predictions of any :class:`~histoclass.models.classifier.Classifier` on images, folders or a
manifest split, and the one builder of the predictions CSV's columns.

Images are decoded and prepared (stain, resize, normalise: the classifier's own
:attr:`preparation`) in a pool of threads or processes while the model runs the current batch;
an unreadable file becomes a ``(path, reason)`` entry in ``skipped`` instead of stopping the run.
Softmax happens in the classifier, never in the networks.

The predictions CSV has ``path,patient_id,magnification,label`` (``label`` empty when unknown),
``subtype`` (subtype task), ``split,protocol[,fold]`` (from a manifest), then ``p_malignant``
(binary task) or ``p_<class>`` per class, ``pred``, ``confidence`` and the rest of
:func:`score_frame`, and ``error`` when some output was NaN/inf."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from histoclass.calibration import recovered, referral
from histoclass.data.breakhis import describe_path
from histoclass.data.files import refuse_output, walk
from histoclass.data.images import IMAGE_SUFFIXES, ImageLoadError, load_rgb
from histoclass.models.classifier import Classifier, Preparation, Scores, concat_scores, nonfinite

log = logging.getLogger(__name__)
INFO = ("path", "patient_id", "magnification", "label")
EXECUTORS = ("thread", "process")
NONFINITE = "non-finite model output (NaN or inf): no class assigned"


class Predictions(NamedTuple):
    """A predictions table and the inputs left out, as ``(path, reason)``."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]]


class Outputs(NamedTuple):
    """Outputs for the readable rows ``index`` of a path list, and the rows left out."""

    index: list[int]
    proba: np.ndarray  # [N, C]
    pred: np.ndarray  # [N]
    members: np.ndarray  # [M, N, C]
    disagreement: np.ndarray  # [N]
    skipped: list[tuple[str, str]]

    @property
    def scores(self) -> Scores:
        """The model outputs without the row bookkeeping."""
        return Scores(self.proba, self.pred, self.members, self.disagreement)


def load_prepared(path: str, preparation: Preparation) -> list[Any] | str:
    """Decode one file and prepare it, or return why it cannot be used."""
    try:
        return preparation(load_rgb(path))
    except ImageLoadError as exc:
        return exc.reason
    except Exception as exc:  # a stain step failing on one odd image must not stop the run
        return f"{type(exc).__name__}: {exc}"


def prepared_batches(paths: Sequence[Any], preparation: Preparation, batch_size: int = 16,
                     workers: int = 2, executor: str = "thread", progress: bool = False,
                     desc: str = "predict",
                     loader: Callable[[Any, Preparation], list[Any] | str] = load_prepared,
                     ) -> Iterator[tuple[list[int], list[list[Any]], list[tuple[str, str]]]]:
    """``(rows, prepared items, skipped (path, reason))`` per batch, in path order.

    ``workers`` threads (or processes) decode ahead: two batches are in flight while the
    caller runs the current one (PyTorch and ONNX Runtime release the GIL), so on a folder of
    PNGs a run is limited by decoding, not by the network. ``workers=0`` decodes inline.
    ``loader(item, preparation)`` returns the prepared item or why it cannot be used (the
    slide engine passes tiles and a region reader instead of paths and :func:`load_prepared`).
    """
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose {' or '.join(EXECUTORS)}")
    pool: Executor | None = None
    if workers > 0:
        pool = (ThreadPoolExecutor if executor == "thread" else ProcessPoolExecutor)(workers)
    ahead = 2 * batch_size + workers
    pending: deque = deque()
    todo = iter(enumerate(paths))
    bar = tqdm(total=len(paths), disable=None if progress else True, desc=desc)  # None: tty only

    def fill() -> None:
        for i, p in todo:
            pending.append((i, pool.submit(loader, p, preparation) if pool
                            else loader(p, preparation)))
            if len(pending) >= ahead:
                return

    try:
        fill()
        while pending:
            rows, items, bad = [], [], []
            while pending and len(rows) < batch_size:
                i, fut = pending.popleft()
                out = fut.result() if pool else fut
                if isinstance(out, str):
                    log.warning("skipped %s: %s", paths[i], out)
                    bad.append((paths[i], out))
                else:
                    rows.append(i)
                    items.append(out)
            fill()
            bar.update(len(rows) + len(bad))
            yield rows, items, bad
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def run(clf: Classifier, paths: Sequence[str | Path], *, tta: bool = False,
        batch_size: int = 16, workers: int = 0, executor: str = "thread",
        progress: bool = False) -> Outputs:
    """Scores of ``clf`` on image files (see :func:`prepared_batches`)."""
    paths = [str(p) for p in paths]
    index, parts, skipped = [], [], []
    for rows, items, bad in prepared_batches(paths, clf.preparation, batch_size, workers,
                                             executor, progress):
        skipped += bad
        if rows:
            parts.append(clf.predict_prepared(items, tta=tta))
            index += rows
    return Outputs(index, *concat_scores(parts, len(clf.classes), len(clf.member_names)),
                   skipped)


def prob_columns(classes: Sequence[str], prefix: str = "") -> list[str]:
    """``p_malignant`` for the binary task, else ``p_<class>`` for every class."""
    if list(classes) == ["benign", "malignant"]:
        return [f"{prefix}p_malignant"]
    return [f"{prefix}p_{c}" for c in classes]


def _probs(frame: pd.DataFrame, classes: Sequence[str], p: np.ndarray, prefix: str = "") -> None:
    cols = prob_columns(classes, prefix)
    p = p.astype(float)
    frame[cols] = p[:, 1:] if len(cols) == 1 else p


def score_frame(clf: Classifier, scores: Scores, refer_threshold: float | None = None
                ) -> pd.DataFrame:
    """The scored columns of the predictions CSV (every table of predictions is built here):
    ``p_...`` (after the temperature), ``pred``, ``confidence`` (top probability), ``raw.p_...``
    (before it; only when ``T != 1``), for ensembles ``member.<name>.p_...`` and
    ``disagreement``, and ``refer``/``refer_reason``: confidence below the stated-risk threshold
    or disagreement above ``refer_threshold`` (default the model's). A row with a non-finite
    output (:func:`nonfinite`) never gets a class: empty probabilities and ``pred``, ``refer``
    1, and an ``error`` column (added last, only when some row needs it) says why.
    """
    bad = nonfinite(scores)
    frame = pd.DataFrame(index=range(len(scores.proba)))
    proba = np.where(bad[:, None], np.nan, scores.proba)
    _probs(frame, clf.classes, proba)
    frame["pred"] = ["" if b else clf.classes[i] for i, b in zip(scores.pred.tolist(), bad,
                                                                  strict=True)]
    frame["confidence"] = proba.max(axis=1) if len(proba) else []
    t, low = getattr(clf, "temperature", 1.0), getattr(clf, "confidence_threshold", None)
    if t != 1.0:  # the network's own probabilities, for audits
        _probs(frame, clf.classes, recovered(proba, t), "raw.")
    disagree = None
    if clf.is_ensemble:
        for m, name in enumerate(clf.member_names):
            _probs(frame, clf.classes, np.where(bad[:, None], np.nan, scores.members[m]),
                   f"member.{name}.")
        threshold = clf.refer_threshold if refer_threshold is None else refer_threshold
        frame["disagreement"] = np.where(bad, np.nan, scores.disagreement.astype(float))
        disagree = (frame["disagreement"] > threshold).to_numpy()
    if clf.is_ensemble or low is not None:
        frame["refer"], frame["refer_reason"] = referral(frame["confidence"].fillna(1.0), low,
                                                         disagree, bad)
    if bad.any():
        log.error("%d image(s) gave non-finite model outputs (NaN/inf): marked as errors, "
                  "no class assigned", int(bad.sum()))
        frame["error"] = np.where(bad, NONFINITE, "")
    return frame


def describe(path: str | Path, root: Path | None = None) -> dict[str, str]:
    """Patient, magnification, label and subtype from a BreakHis name or class folder (empty
    when unknown: predictions need no label)."""
    row = {"path": str(path), "patient_id": "", "magnification": "", "label": "", "subtype": ""}
    try:
        found = describe_path(path, root) or {}
    except ValueError as exc:  # a contradictory name: predict it, but claim no label
        log.warning("%s", exc)
        return row
    return {**row, **{k: v for k, v in found.items() if k in row}}


def expand_inputs(items: Sequence[str | Path]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Image files and folders (searched recursively) -> info rows, plus what was left out
    (folders histoclass wrote, such as ``explain`` outputs, among them)."""
    rows, skipped = [], []
    for item in items:
        item = Path(item)
        if item.is_dir() and refuse_output(item):
            skipped.append((str(item), refuse_output(item)))
        elif item.is_dir():
            files, odd = walk(item)  # follows symlinked folders; lists links, FIFOs, outputs
            skipped += odd
            if not files and not odd:
                skipped.append((str(item), "empty folder"))
            for p in files:
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append(describe(p, item))
                else:
                    skipped.append((str(p), f"not an image file (suffix {p.suffix or 'none'!r})"))
        elif item.is_file():
            rows.append(describe(item))
        else:
            skipped.append((str(item), "no such file or folder"))
    return pd.DataFrame(rows, columns=[*INFO, "subtype"]), skipped


def predict_paths(clf: Classifier, paths: Sequence[str | Path], *,
                  info: pd.DataFrame | None = None, tta: bool = False, batch_size: int = 16,
                  workers: int = 0, executor: str = "thread",
                  refer_threshold: float | None = None, progress: bool = False,
                  runner: Callable[..., Outputs] = run) -> Predictions:
    """Predict image files.

    Args:
        clf: A loaded model (:func:`histoclass.models.load_model_file`, or an ONNX export).
        paths: Image files.
        info: Rows aligned with ``paths`` holding the descriptive columns (``path``,
            ``patient_id``, ``magnification``, ``label``, optional ``subtype``/``split``/
            ``protocol``); derived from the names when ``None``.
        tta: Average the 8 flips/90-degree rotations (PyTorch models).
        batch_size: Images per forward pass.
        workers: Decoding threads (or processes, see ``executor``); 0 decodes inline.
        executor: ``thread`` or ``process``.
        refer_threshold: Overrides the ensemble's disagreement threshold for ``refer``.
        progress: Show a progress bar.
        runner: Scores the paths, called as :func:`run` (the Ray engine,
            :func:`histoclass.distributed.ray_run`, scores chunks on actors).
    """
    paths = [str(p) for p in paths]
    if info is None:
        info = pd.DataFrame([describe(p) for p in paths], columns=[*INFO, "subtype"])
    out = runner(clf, paths, tta=tta, batch_size=batch_size, workers=workers,
                 executor=executor, progress=progress)
    keep = list(INFO) + (["subtype"] if clf.task == "subtype" else [])
    keep += [c for c in ("split", "protocol", "fold") if c in info.columns]
    frame = info.iloc[out.index].reindex(columns=keep).fillna("").reset_index(drop=True)
    frame = pd.concat([frame, score_frame(clf, out.scores, refer_threshold)], axis=1)
    log.info("predicted %d image(s), skipped %d", len(frame), len(out.skipped))
    return Predictions(frame, out.skipped)


def predict_manifest(clf: Classifier, manifest: str | Path, split: str = "test",
                     fold: int | None = None, **kwargs: Any) -> Predictions:
    """Predict one split of a manifest (``kwargs`` go to :func:`predict_paths`)."""
    from histoclass.data.manifest import read_manifest, select

    frame = select(read_manifest(manifest), split, fold)
    if frame.empty:
        raise ValueError(f"{manifest}: no {split!r} rows" + (f" in fold {fold}" if fold else ""))
    info = frame.drop(columns=["fold"], errors="ignore")  # a row's test fold, not this fold
    if fold is not None:
        info["split"] = frame[f"split_fold{fold}"]
        info["fold"] = str(fold)  # the evaluation names the fold it scores
    return predict_paths(clf, list(frame["path"]), info=info, **kwargs)


def check_out(out: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, a predictions ``out`` that cannot be written, that is one of
    the ``inputs``, or that is named like a skip list (``*.skipped.csv``)."""
    from histoclass.data.files import check_output

    out = Path(out)
    if out.name.endswith(".skipped.csv"):
        raise ValueError(f"--out {out}: *.skipped.csv is where a run lists the inputs it left "
                         "out; choose another name")
    return check_output(out, "file", inputs=tuple(inputs))


def write_predictions(pred: Predictions, out: str | Path) -> tuple[Path, Path]:
    """Write the CSV and ``<out stem>.skipped.csv`` (``path,reason``) beside it; returns both
    paths."""
    from histoclass.data.manifest import skip_list_path, write_manifest

    out = Path(out)
    csv = write_manifest(pred.frame, out)
    skipped = write_manifest(pd.DataFrame(pred.skipped, columns=["path", "reason"]),
                             skip_list_path(out))
    return csv, skipped
