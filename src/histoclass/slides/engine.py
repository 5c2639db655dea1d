"""Many slides on many workers: a local process pool or Ray actors, one model per worker.

``run_slides(open_model, slides, out, engine="local"|"ray")`` scores each slide with
:func:`~histoclass.slides.run.predict_slide` (the same files in ``OUT/<stem>/`` as
``histoclass slide``) and keeps a run manifest ``OUT/slides.csv`` (:data:`COLUMNS`: status
``done``, ``failed`` with a one-line reason, or ``skipped`` when an earlier run finished it),
rewritten atomically after every slide, so a rerun does only what is left and one bad slide never
loses another's results. Each worker (process or Ray actor) loads the model once. A worker that
dies is replaced and its slide retried, resuming from the tiles it had written: on Ray by actor
restarts (``max_restarts`` / ``max_task_retries``), locally by a new process pool; a slide is
failed after :data:`~histoclass.distributed.RETRIES` deaths. ``open_model`` is a picklable
no-argument callable returning a :class:`~histoclass.models.classifier.Classifier` (e.g.
``functools.partial`` of ``histoclass.api.open_classifier``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from histoclass.distributed import RETRIES, check_engine, start_actors, stop_actors
from histoclass.slides.batch import expand_slides
from histoclass.slides.reader import SlideError
from histoclass.slides.run import SlideOptions, predict_slide

log = logging.getLogger(__name__)
COLUMNS = ("slide", "path", "patient_id", "status", "reason", "verdict",
           "top_k_mean_p_malignant", "tiles", "seconds", "worker")
# Test hook: "STEM:MARKER[,STEM:MARKER...]" makes the worker scoring slide STEM exit after its
# first batch, once (the MARKER file records that it happened; an empty MARKER: every time), to
# check that a killed worker is retried.
CRASH_ENV = "HISTOCLASS_CRASH_ONCE"


def read_slides(slides: str | Path) -> list[dict[str, Any]]:
    """SLIDES (a folder, searched recursively, or a CSV with ``path`` and optional
    ``patient_id``, ``mpp``; relative paths are relative to the CSV) -> one dict per slide.

    Raises:
        ValueError: SLIDES is neither, or the CSV has no ``path`` column.
    """
    slides = Path(slides)
    if slides.is_dir():
        paths, _ = expand_slides([slides])
        return [{"path": p, "patient_id": None, "mpp": None} for p in paths]
    if not (slides.is_file() and slides.suffix.lower() == ".csv"):
        raise ValueError(f"{slides}: SLIDES must be a folder of slides or a CSV with a 'path' "
                         "column (optional patient_id, mpp)")
    table = pd.read_csv(slides, dtype={"patient_id": str})
    if "path" not in table.columns:
        raise ValueError(f"{slides}: no 'path' column (has {', '.join(map(str, table.columns))})")
    rows = []
    for rec in table.to_dict("records"):
        path = Path(str(rec["path"]))
        mpp = rec.get("mpp")
        pid = rec.get("patient_id")
        rows.append({"path": path if path.is_absolute() else slides.parent / path,
                     "patient_id": None if pd.isna(pid) else str(pid),
                     "mpp": None if mpp is None or pd.isna(mpp) else float(mpp)})
    return rows


def _crash_hook(stem: str) -> Callable[[int, int], None] | None:
    specs = dict(spec.partition(":")[::2] for spec in os.environ.get(CRASH_ENV, "").split(","))
    marker = specs.get(stem)
    if marker is None or (marker and Path(marker).exists()):
        return None

    def crash(done: int, total: int) -> None:
        if done < total:
            if marker:
                Path(marker).write_text(f"{os.getpid()}\n")
            log.warning("test hook %s: worker %d exits mid-slide", CRASH_ENV, os.getpid())
            os._exit(1)
    return crash


def score_one(clf: Any, item: dict[str, Any], out: str, options: SlideOptions,
              worker: str) -> dict[str, Any]:
    """One slide -> its manifest row; a slide that cannot be used is a ``failed`` row."""
    from dataclasses import replace

    path, start = Path(item["path"]), time.perf_counter()
    row = {"slide": path.name, "path": str(path), "patient_id": item.get("patient_id"),
           "worker": worker}
    opts = options if item.get("mpp") is None else replace(options, mpp=item["mpp"])
    try:
        s = predict_slide(clf, path, out, opts, on_progress=_crash_hook(path.stem))
    except (SlideError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).removeprefix(f"{path}: ").split())
        log.warning("failed slide %s: %s", path, reason)
        return {**row, "status": "failed", "reason": reason, "tiles": None,
                "seconds": round(time.perf_counter() - start, 3)}
    return {**row, "status": "done", "reason": None, "verdict": s["verdict"],
            "top_k_mean_p_malignant": s["top_k_mean_p_malignant"], "tiles": s["tiles_scored"],
            "seconds": s["seconds"]}


_CLF: Any = None  # the model of a local pool's worker process


def _local_init(open_model: Callable[[], Any], threads: int) -> None:
    global _CLF
    import torch

    torch.set_num_threads(threads)  # the cores shared out: N workers x all cores would thrash
    _CLF = open_model()


def _local_task(item: dict[str, Any], out: str, options: SlideOptions) -> dict[str, Any]:
    return score_one(_CLF, item, out, options, f"local:{os.getpid()}")


class SlideWorker:
    """A Ray actor's body: the model loaded once, then one slide per call."""

    def __init__(self, open_model: Callable[[], Any]) -> None:
        self.clf = open_model()
        self.name = f"ray:{socket.gethostname()}:{os.getpid()}"

    def run(self, item: dict[str, Any], out: str, options: SlideOptions) -> dict[str, Any]:
        return score_one(self.clf, item, out, options, self.name)


def _earlier(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run's manifest by slide path (none when absent or unreadable)."""
    try:
        old = pd.read_csv(out / "slides.csv", dtype={"patient_id": str})
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    if not set(COLUMNS) <= set(old.columns):
        return {}
    old = old.astype(object).where(old.notna(), None)
    return {r["path"]: r for r in old.to_dict("records")}


def run_slides(open_model: Callable[[], Any], slides: str | Path | Sequence[dict[str, Any]],
               out: str | Path, engine: str = "local", workers: int = 1,
               address: str | None = None, gpus_per_worker: float = 0.0,
               options: SlideOptions = SlideOptions(),
               on_row: Callable[[dict[str, Any]], None] | None = None) -> pd.DataFrame:
    """Score every slide of SLIDES on ``engine`` and return the run manifest (``OUT/slides.csv``).

    Args:
        open_model: Picklable no-argument callable returning the classifier (run once per worker).
        slides: A folder, a CSV (see :func:`read_slides`) or its rows.
        out: Output folder (``OUT/<stem>/`` per slide, ``OUT/slides.csv``).
        engine: ``local`` (a spawned process pool) or ``ray``.
        workers: Worker processes (local) or actors (ray); also ``num_cpus`` of a local Ray.
        address: Ray cluster to join (``auto``, ``ray://host:10001``); none: a local Ray is started
            unless one is already initialised in this process.
        gpus_per_worker: GPUs reserved by each Ray actor (0: CPU actors).
        options: Slide settings (``histoclass slide``'s options); with ``restart`` the slides
            an earlier run finished are scored again too.
        on_row: Called with each manifest row as it is written.

    Raises:
        ValueError: Unknown engine, workers < 1, or bad SLIDES.
        histoclass.distributed.RayMissingError: ``engine="ray"`` without Ray (an ``ImportError``
            whose message names the ``ray`` extra).
    """
    from histoclass.data.manifest import write_manifest

    check_engine(engine, workers)
    items = read_slides(slides) if isinstance(slides, (str, Path)) else list(slides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    earlier, rows, todo, stems = _earlier(out), {}, [], {}
    for item in items:
        path = str(item["path"])
        stem = Path(path).stem
        if stem in stems:
            rows[path] = {"slide": Path(path).name, "path": path, "status": "failed",
                          "patient_id": item.get("patient_id"),
                          "reason": f"another slide in this run, {stems[stem]}, has the same "
                                    f"name stem {stem!r} (one folder per stem)"}
            continue
        stems[stem] = path
        old = earlier.get(path)
        if (not options.restart and old and old["status"] in ("done", "skipped")
                and (out / stem / "summary.json").exists()):
            rows[path] = {**old, "status": "skipped", "reason": "done in an earlier run"}
        else:
            rows[path] = {"slide": Path(path).name, "path": path, "status": "pending",
                          "patient_id": item.get("patient_id")}
            todo.append({**item, "path": path})

    def record(row: dict[str, Any]) -> None:
        rows[row["path"]] = row
        write_manifest(pd.DataFrame(list(rows.values()), columns=list(COLUMNS)),
                       out / "slides.csv")
        if on_row is not None and row["status"] != "pending":
            on_row(row)

    for row in [r for r in rows.values() if r["status"] != "pending"]:
        record(row)
    if todo:
        record(rows[todo[0]["path"]])  # the manifest lists the pending slides from the start
        runner = _run_ray if engine == "ray" else _run_local
        runner(open_model, todo, str(out), options, workers, address, gpus_per_worker, record)
    return pd.read_csv(out / "slides.csv", dtype={"patient_id": str})


def _run_local(open_model: Callable[[], Any], todo: list[dict[str, Any]], out: str,
               options: SlideOptions, workers: int, address: str | None, gpus: float,
               record: Callable[[dict[str, Any]], None]) -> None:
    """A spawned process pool, at most ``workers`` slides in flight. A dead worker breaks the
    pool: a new one is made, the slides that were in flight are retried one at a time (so a
    further death is pinned on its slide; each resumes from the tiles it wrote) before the
    others go on in parallel; a slide in flight at :data:`RETRIES` deaths is failed."""
    waiting, suspects, deaths = list(todo), [], {}
    while waiting or suspects:
        if suspects:
            broken, suspects = _pool_round(open_model, suspects, 1, out, options, record)
        else:
            broken, waiting = _pool_round(open_model, waiting, min(workers, len(waiting)), out,
                                          options, record)
        for item in reversed(broken):
            deaths[item["path"]] = deaths.get(item["path"], 0) + 1
            if deaths[item["path"]] < RETRIES:
                suspects.insert(0, item)
                continue
            record({"slide": Path(item["path"]).name, "path": item["path"],
                    "patient_id": item.get("patient_id"), "status": "failed",
                    "reason": f"the worker process died on all {RETRIES} attempts at this slide"
                              " (crash or out of memory); rerun to resume"})


def _pool_round(open_model: Callable[[], Any], items: list[dict[str, Any]], width: int, out: str,
                options: SlideOptions, record: Callable[[dict[str, Any]], None]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score ``items`` in order on a new pool of ``width`` processes, ``width`` at a time (so
    every slide in flight is on a worker). Returns the slides in flight when a worker died (in
    ``items`` order) and those not yet started; both empty when the pool lasted."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    rest, broken, flight = list(items), [], {}
    with ProcessPoolExecutor(width, mp_context=ctx, initializer=_local_init,
                             initargs=(open_model, max(1, (os.cpu_count() or 1) // width))
                             ) as pool:
        while (rest and not broken) or flight:
            while rest and not broken and len(flight) < width:
                item = rest.pop(0)
                flight[pool.submit(_local_task, item, out, options)] = item
            done, _ = wait(flight, return_when=FIRST_COMPLETED)
            for fut in done:
                item = flight.pop(fut)
                try:
                    record(fut.result())
                except BrokenProcessPool:  # the pool cannot go on: its other futures end too
                    log.warning("a worker process died with %s in flight", item["path"])
                    broken.append(item)
    order = {it["path"]: n for n, it in enumerate(items)}
    return sorted(broken, key=lambda it: order[it["path"]]), rest


def _run_ray(open_model: Callable[[], Any], todo: list[dict[str, Any]], out: str,
             options: SlideOptions, workers: int, address: str | None, gpus: float,
             record: Callable[[dict[str, Any]], None]) -> None:
    import ray

    pool = start_actors(SlideWorker, (open_model,), min(workers, len(todo)), address, gpus)
    queue, pending = list(todo), {}

    def give(actor: Any) -> None:  # one slide per actor at a time: the free one takes the next
        item = queue.pop(0)
        pending[actor.run.remote(item, out, options)] = (item, actor)

    for actor in pool:
        give(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        item, actor = pending.pop(ready[0])
        if queue:
            give(actor)
        try:
            record(ray.get(ready[0]))
        except (ray.exceptions.RayError, OSError) as exc:
            reason = " ".join(str(exc).split())[:300]
            record({"slide": Path(item["path"]).name, "path": item["path"],
                    "patient_id": item.get("patient_id"), "status": "failed",
                    "reason": f"Ray worker failed after {RETRIES} retries: {reason}"})
    stop_actors(pool)
