"""Normalize a whole data set once: a stain-normalized copy of every image plus a manifest.

Imported explicitly (``histoclass.stain.batch``) because it needs pandas and the data layer,
which the per-image normalizers do not.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from histoclass.data import ImageLoadError, load_rgb, resolve_data, scan, write_manifest
from histoclass.data.files import atomic_write, read_csv
from histoclass.data.images import to_array
from histoclass.stain import Normalizer, save

log = logging.getLogger(__name__)

TARGET_JSON = "stain_target.json"
# Lossy formats are re-encoded near-losslessly: normalized copies should not add artefacts.
# PNG at zlib level 1: on H&E it writes 3x faster than the default 6 for ~1% larger files.
_SAVE_OPTIONS = {
    "JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"lossless": True},
    "PNG": {"compress_level": 1},
}


@dataclass
class BatchResult:
    """What a batch run wrote and what it left out."""

    frame: pd.DataFrame  # manifest rows; ``path`` relative to ``out``
    manifest: Path
    target: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), not written
    unchanged: list[tuple[str, str]] = field(default_factory=list)  # copied as is, with reason

    def summary(self) -> str:
        """One line: images written, passed through, skipped."""
        return (
            f"{len(self.frame)} images written ({len(self.unchanged)} passed through unchanged), "
            f"{len(self.skipped)} skipped; manifest: {self.manifest}"
        )


_NORMALIZER: Normalizer | None = None


def _init_worker(normalizer: Normalizer) -> None:
    global _NORMALIZER
    _NORMALIZER = normalizer
    # The parent reports pass-throughs once, by name; workers stay quiet about them.
    logging.getLogger("histoclass.stain").setLevel(logging.ERROR)
    # One process per core already: BLAS threads on top would only oversubscribe the cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _one(job: tuple[str, str]) -> tuple[str, str, str | None]:
    """Normalize ``src`` into ``dst``; returns (status, src, detail), status ok/unchanged/bad."""
    src, dst = job
    assert _NORMALIZER is not None
    try:
        img = to_array(load_rgb(src))
        out, reason = _NORMALIZER.apply(img, name=src)
        path = Path(dst)
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        # a half-written copy never carries the final name, and none is left on failure
        atomic_write(path, lambda fh: Image.fromarray(out).save(fh, format=fmt,
                                                                **_SAVE_OPTIONS.get(fmt, {})))
    except ImageLoadError as exc:
        return "bad", src, exc.reason
    except (OSError, ValueError) as exc:
        return "bad", src, f"{type(exc).__name__}: {exc}"
    return ("unchanged" if reason else "ok"), src, reason


def _input_table(data: Path, kept: pd.DataFrame) -> pd.DataFrame:
    """Scanned rows; for a CSV input, its own rows and all its columns instead."""
    if not data.is_file():
        return kept
    table = read_csv(data, "data CSV")
    table["path"] = [
        str((Path(p) if Path(p).is_absolute() else data.parent / p).resolve())
        for p in table["path"]
    ]
    return table[table["path"].isin(set(kept["path"]))].reset_index(drop=True)


def _common_folder(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([p.parent for p in paths]))


def normalize_dataset(
    data: str | Path, normalizer: Normalizer, out: str | Path, *, workers: int = 2,
    progress: bool = False,
) -> BatchResult:
    """Write a normalized copy of every image under ``data`` into ``out``.

    Copies keep their paths relative to the data folder (for a CSV, to the folder all its images
    share); ``out/manifest.csv`` lists them (a CSV input keeps all its columns, with ``path``
    rewritten and ``source_path`` added), and ``out/stain_target.json`` holds the fitted target.

    Args:
        data: Folder, CSV/manifest, or ``sample[:name]`` (see :func:`histoclass.data.scan`).
        normalizer: Fitted normalizer.
        out: Output folder; must not be, or lie inside, the input folder.
        workers: Processes normalizing images.
        progress: Show a progress bar.

    Raises:
        ValueError: ``out`` would overwrite or nest inside the input images.
        histoclass.data.ScanError: ``data`` holds no readable image.
    """
    data, out = resolve_data(data), Path(out)
    scanned = scan(data, workers=workers, progress=progress)
    table = _input_table(data, scanned.frame)
    sources = [Path(p) for p in table["path"]]
    root = data.resolve() if data.is_dir() else _common_folder(sources)
    if out.resolve() == root or root in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the input folder {root}; choose another folder")
    rel = [p.relative_to(root).as_posix() for p in sources]
    # A CSV may list one image twice: normalize it once (two writers would race on one file).
    jobs = list(dict.fromkeys((str(p), str(out / r)) for p, r in zip(sources, rel, strict=True)))

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(normalizer,)) as pool:
            results = list(tqdm(pool.map(_one, jobs, chunksize=4), total=len(jobs),
                                disable=None if progress else True, desc="stain"))
    else:  # in this process: same quiet logger, restored afterwards; BLAS threads untouched
        global _NORMALIZER
        _NORMALIZER = normalizer
        quiet = logging.getLogger("histoclass.stain")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            results = [_one(j) for j in tqdm(jobs, disable=None if progress else True,
                                             desc="stain")]
        finally:
            quiet.setLevel(level)

    skipped = list(scanned.skipped)
    unchanged, ok = [], []
    for status, src, detail in results:
        if status == "bad":
            log.warning("skipped %s: %s", src, detail)
            skipped.append((src, detail))
        else:
            ok.append(src)
            if status == "unchanged":
                log.warning("passed through unchanged: %s: %s", src, detail)
                unchanged.append((src, detail))
    keep = table["path"].isin(set(ok))
    frame = table[keep].copy()
    if "source_path" not in frame:  # a re-normalized copy keeps pointing at the original
        frame.insert(1, "source_path", frame["path"])
    frame["path"] = [r for r, k in zip(rel, keep, strict=True) if k]
    manifest = write_manifest(frame.reset_index(drop=True), out / "manifest.csv")
    target = save(normalizer, out / TARGET_JSON)
    return BatchResult(frame, manifest, target, skipped, unchanged)
