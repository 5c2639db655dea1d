"""Work spread over Ray actors: joining a cluster (or starting a local Ray), one actor per worker
holding the model, the one-line error when Ray is missing, and image predictions in chunks.

The slide engine (:mod:`histoclass.slides.engine`) and ``histoclass predict --engine ray`` start
their actors here. An actor loads the model once (``open_model``, a picklable no-argument callable
returning a :class:`~histoclass.models.classifier.Classifier`, e.g. ``functools.partial`` of
``histoclass.api.open_classifier``); one that dies is restarted and its call retried
(:data:`RETRIES`).

Images on Ray (:func:`image_runner`): the ordered path list is cut into one contiguous chunk
per actor, each chunk comes back as its rows' raw scores, and the chunks are joined in input
order, so the table, its columns and the skipped list are built exactly as a local run builds
them (:func:`histoclass.predict.predict_paths`): rows in input order, bad images in input order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from histoclass.models.classifier import Classifier, concat_scores
from histoclass.predict import Outputs, run

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
RETRIES = 3  # restarts of a dead Ray actor, and retries of the call it was running
RAY_MISSING = "--engine ray needs Ray: pip install 'histoclass[ray]'"
DECODE_THREADS = 2  # decoding threads inside each image actor (overlapped with inference)


class RayMissingError(ImportError):
    """``--engine ray`` was asked for and Ray is not installed (the message names the extra)."""


class WorkerFailedError(RuntimeError):
    """A Ray actor kept failing after its retries."""


def require_ray() -> Any:
    """The ``ray`` module.

    Raises:
        RayMissingError: Ray is not installed (:data:`RAY_MISSING`).
    """
    try:
        import ray
    except ImportError:
        raise RayMissingError(RAY_MISSING) from None
    return ray


def check_engine(engine: str, workers: int, fewest: int = 1) -> None:
    """Refuse an unknown engine, fewer than ``fewest`` workers (always one on Ray), or ``ray``
    without Ray, before any work.

    Raises:
        ValueError: Naming the bad value and the valid ones.
        RayMissingError: ``engine="ray"`` without Ray.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    fewest = 1 if engine == "ray" else fewest
    if workers < fewest:
        raise ValueError(f"--workers {workers} must be >= {fewest}"
                         + (" with --engine ray" if engine == "ray" else ""))
    if engine == "ray":
        require_ray()


def start_actors(cls: type, args: tuple[Any, ...], workers: int, address: str | None = None,
                 gpus_per_worker: float = 0.0) -> list[Any]:
    """``workers`` Ray actors of ``cls(*args)``, one CPU (and ``gpus_per_worker`` GPUs) each.

    Args:
        cls: The actor's body (a plain class; made a Ray actor here).
        args: Its constructor arguments (picklable).
        workers: Actors to start; also the ``num_cpus`` of a local Ray started here.
        address: Ray cluster to join (``auto``, ``ray://host:10001``); none: a local Ray is
            started unless one is already initialised in this process.
        gpus_per_worker: GPUs reserved by each actor (0: CPU actors).
    """
    ray = require_ray()
    if address is not None:
        ray.init(address=address, ignore_reinit_error=True)
    elif not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False)
    workers = placeable(ray.cluster_resources(), workers, gpus_per_worker)
    actor = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(cls)
    return [actor.options(num_cpus=1, num_gpus=gpus_per_worker).remote(*args)
            for _ in range(workers)]


def placeable(resources: dict[str, float], workers: int, gpus_per_worker: float = 0.0) -> int:
    """How many of ``workers`` actors (1 CPU and ``gpus_per_worker`` GPUs each) the cluster's
    ``resources`` hold: an actor Ray cannot place waits forever with its work, so fewer actors
    are started (with a warning) rather than a run that never ends.

    Raises:
        ValueError: Not even one actor fits (e.g. GPUs asked of a CPU-only cluster).
    """
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fits = int(cpus // 1)
    if gpus_per_worker > 0:
        fits = min(fits, int(gpus // gpus_per_worker + 1e-9))
    if fits < 1:
        raise ValueError(f"the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s): no room for "
                         f"one worker of 1 CPU and {gpus_per_worker:g} GPU(s); lower "
                         "--gpus-per-worker or add nodes")
    if fits < workers:
        log.warning("the Ray cluster holds %d worker(s) of 1 CPU and %g GPU(s) (it has %g CPU, "
                    "%g GPU); starting %d, not %d", fits, gpus_per_worker, cpus, gpus, fits,
                    workers)
    return min(workers, fits)


def stop_actors(actors: Sequence[Any]) -> None:
    """End actors started by :func:`start_actors` (their models are freed)."""
    ray = require_ray()
    for a in actors:
        ray.kill(a)


def chunks(n: int, k: int) -> list[range]:
    """``range(n)`` cut into ``min(k, n)`` contiguous chunks whose sizes differ by at most 1."""
    k = max(1, min(k, n))
    size, extra = divmod(n, k)
    starts = [i * size + min(i, extra) for i in range(k + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(k)]


class ImageWorker:
    """A Ray actor's body: the model loaded once, then the raw scores of one chunk per call."""

    def __init__(self, open_model: Callable[[], Any]) -> None:
        self.clf = open_model()

    def run(self, paths: list[str], tta: bool, batch_size: int, executor: str) -> Outputs:
        return run(self.clf, paths, tta=tta, batch_size=batch_size, workers=DECODE_THREADS,
                   executor=executor)


def ray_run(actors: Sequence[Any], clf: Classifier, paths: Sequence[str | Path], *,
            tta: bool = False, batch_size: int = 16, workers: int = 0,
            executor: str = "thread", progress: bool = False) -> Outputs:
    """:func:`histoclass.predict.run` on Ray actors: one contiguous chunk of ``paths`` per actor,
    the chunks' rows and skipped files joined back in input order (``workers`` and
    ``progress`` are the actors' own business: :data:`DECODE_THREADS` each, no bar).

    Raises:
        WorkerFailedError: An actor died more than :data:`RETRIES` times or raised.
    """
    ray = require_ray()
    paths = [str(p) for p in paths]
    parts = chunks(len(paths), len(actors))
    refs = [a.run.remote(paths[r.start:r.stop], tta, batch_size, executor)
            for a, r in zip(actors, parts, strict=False)]
    try:
        outs = ray.get(refs)
    except ray.exceptions.RayError as exc:
        raise WorkerFailedError("a Ray worker failed after "
                           f"{RETRIES} retries: {' '.join(str(exc).split())[:300]}") from None
    index, scores, skipped = [], [], []
    for r, o in zip(parts, outs, strict=True):
        index += [r.start + i for i in o.index]
        scores.append(o.scores)
        skipped += o.skipped
    log.info("scored %d image(s) in %d chunk(s) on Ray", len(paths), len(parts))
    return Outputs(index, *concat_scores(scores, len(clf.classes), len(clf.member_names)),
                   skipped)


@contextlib.contextmanager
def image_runner(engine: str, open_model: Callable[[], Any], workers: int = 1,
                 address: str | None = None, gpus_per_worker: float = 0.0
                 ) -> Iterator[Callable[..., Outputs]]:
    """The ``runner`` of :func:`histoclass.predict.predict_paths` (and ``predict_manifest``)
    for ``engine``: :func:`histoclass.predict.run` here (``local``), or :func:`ray_run` on
    ``workers`` Ray actors (``ray``: started at the first call with images, at most one per
    image, stopped on exit). Either way the rows and the skipped files are in input order.

    Raises:
        ValueError: Unknown engine or workers < 1.
        RayMissingError: ``engine="ray"`` without Ray.
    """
    check_engine(engine, workers, fewest=0)
    if engine == "local":
        yield run
        return
    actors: list[Any] = []

    def runner(clf: Classifier, paths: Sequence[str | Path], **kwargs: Any) -> Outputs:
        if not paths:
            return run(clf, [], **kwargs)
        if not actors:
            actors.extend(start_actors(ImageWorker, (open_model,), min(workers, len(paths)),
                                       address, gpus_per_worker))
        return ray_run(actors, clf, paths, **kwargs)

    try:
        yield runner
    finally:
        if actors:
            stop_actors(actors)
