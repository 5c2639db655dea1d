"""The whole study in one call: split -> train members -> ensembles -> predict -> evaluate.

A run is described by a YAML file (see ``configs/``) and lives in one folder. Every step writes
its own file and is skipped when that file exists, so an interrupted run resumes where it
stopped, and a finished run re-evaluates in seconds:

    out/manifest.csv
    out/[fold<k>/]members/<member>/best.pt        (histoclass train)
    out/[fold<k>/]ensembles/<name>.pt             (histoclass ensemble, fitted on val only)
    out/[fold<k>/]preds/<name>.csv                (histoclass predict, test split)
    out/eval/<name>/metrics.json, report.html     (histoclass evaluate; k folds pooled)
    out/summary.csv, out/summary.md               (one row per member and ensemble)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

OFFLINE_HINT = ("offline, set train: {pretrained: false} or weights: {<model>: FILE} in the "
                "config")
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1", "mcc",
                   "patient_recognition_rate", "patient_accuracy")


@dataclass
class RunConfig:
    """A pipeline run, as read from YAML (unknown keys are an error)."""

    data: str
    out: str
    name: str = "run"
    task: str = "binary"
    split: dict[str, Any] = field(default_factory=lambda: {"protocol": "patient"})
    # A member is a model name, or {name, model, ...training overrides} for variants of one
    # model (e.g. the stain-normalisation comparison).
    members: list[Any] = field(default_factory=lambda: ["v1-b0", "v2-b0"])
    train: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    ensembles: list[dict[str, Any]] = field(default_factory=list)
    predict: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a config; ``overrides`` (e.g. ``out``) replace its top-level values."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are "
                             f"{sorted(cls.__dataclass_fields__)}")
        cfg = cls(**raw)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cfg

    def validate(self) -> None:
        """Check every block (each member's training settings, each ensemble, predict,
        evaluate) before any work (:func:`histoclass.preflight.validate_run`).

        Raises:
            ValueError: Naming the block, the key and the valid keys or values.
        """
        from histoclass.preflight import validate_run

        validate_run(self, member_specs(self))


def member_specs(cfg: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, training settings)`` per member, the config's ``train`` block under each."""
    out = []
    for item in cfg.members:
        spec = dict(item) if isinstance(item, dict) else {"name": item}
        name = spec.pop("name")
        out.append((name, {"model": spec.pop("model", name), **cfg.train, **spec}))
    return out


def _folds(cfg: RunConfig) -> list[int | None]:
    if cfg.split.get("protocol") == "kfold":
        return list(range(int(cfg.split.get("folds", 5))))
    return [None]


def make_manifest(cfg: RunConfig) -> Path:
    """Scan and split the data once; later runs reuse the manifest."""
    from histoclass.data import make_split, resolve_data, scan, write_manifest
    from histoclass.data.manifest import skip_list_path

    path = Path(cfg.out) / "manifest.csv"
    if path.is_file():
        return path
    opts = dict(cfg.split)
    protocol = opts.pop("protocol", "patient")
    mags = opts.pop("magnification", None)
    result = scan(resolve_data(cfg.data), groups=opts.pop("groups", None))
    for line in result.grouping_warnings():
        log.warning("%s", line)
    frame = make_split(result.frame, protocol, magnifications=[mags] if isinstance(mags, str)
                       else mags, **opts)
    if result.skipped:  # listed beside the manifest, nothing lost without a word
        log.warning("skipped %d file(s), listed in %s", len(result.skipped),
                    write_manifest(pd.DataFrame(result.skipped, columns=["path", "reason"]),
                                   skip_list_path(path)))
    return write_manifest(frame, path)


def train_members(cfg: RunConfig, manifest: Path, fold: int | None, base: Path) -> list[Path]:
    """Train (or skip when finished) every member of one fold; returns their best.pt files."""
    from histoclass.train import TrainConfig, finished, train

    paths = []
    for name, settings in member_specs(cfg):
        run = base / "members" / name
        if not finished(run):
            log.info("training %s%s", name, "" if fold is None else f" (fold {fold})")
            settings.setdefault("weights", cfg.weights.get(settings["model"]))
            train(TrainConfig(manifest=str(manifest), out=str(run), task=cfg.task, fold=fold,
                              **settings))
        paths.append(run / "best.pt")
    return paths


def build_ensembles(cfg: RunConfig, manifest: Path, fold: int | None, base: Path,
                    members: list[Path]) -> list[Path]:
    """Fit every configured ensemble on the validation split of one fold."""
    from histoclass.models.members import FAMILIES
    from histoclass.train import fit_ensemble

    by_name = dict(zip([n for n, _ in member_specs(cfg)], members, strict=True))
    out = []
    for spec in cfg.ensembles:
        spec = dict(spec)
        name, method = spec.pop("name"), spec.pop("method")
        chosen = spec.pop("members", list(by_name))  # default: every member of this run
        names = FAMILIES[chosen] if isinstance(chosen, str) and chosen in FAMILIES else chosen
        names = [n for n in names if n in by_name]
        path = base / "ensembles" / f"{name}.pt"
        if len(names) < 2:
            log.warning("ensemble %s skipped: fewer than two of its members were trained", name)
            continue
        if not path.is_file():
            log.info("fitting ensemble %s (%s over %s)", name, method, ", ".join(names))
            ens = fit_ensemble([by_name[n] for n in names], method, manifest, fold=fold, **spec)
            ens.save(path)
        out.append(path)
    return out


def predict_test(cfg: RunConfig, manifest: Path, fold: int | None, base: Path,
                 models: list[Path]) -> dict[str, Path]:
    """Predict the test split with every member and ensemble; returns name -> CSV."""
    from histoclass.models.ensemble import load_model_file
    from histoclass.predict import predict_manifest, write_predictions

    out = {}
    for model in models:
        name = model.parent.name if model.name == "best.pt" else model.stem
        csv = base / "preds" / f"{name}.csv"
        if not csv.is_file():
            pred = predict_manifest(load_model_file(model), manifest, "test", fold=fold,
                                    **cfg.predict)
            write_predictions(pred, csv)
        out[name] = csv
    return out


def evaluate_all(cfg: RunConfig, preds: dict[str, list[Path]]) -> pd.DataFrame:
    """Evaluate each model over its folds, write its report, and return the summary table."""
    from histoclass.evaluate import evaluate_files, write_outputs
    from histoclass.report import write_report

    rows = []
    for name, files in preds.items():
        folder = Path(cfg.out) / "eval" / name
        ev = evaluate_files(files, **cfg.evaluate)
        write_outputs(ev, folder)
        write_report(ev, folder / "report.html")
        kind = "member" if name in {n for n, _ in member_specs(cfg)} else "ensemble"
        row = {"model": name, "kind": kind}
        for key in SUMMARY_METRICS:
            row[key] = ev.metrics.get(key)
            if ev.folds:
                row[f"{key}_std"] = ev.folds.get("std", {}).get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def run(cfg: RunConfig, force: bool = False, offline_hint: str = OFFLINE_HINT) -> pd.DataFrame:
    """Run (or resume) the whole pipeline; returns the members-vs-ensembles summary.

    Everything that can be checked is checked before any work and before anything is
    written: the config (:meth:`RunConfig.validate`), the hub when ImageNet weights must come
    from it (seconds, not a minute of retries), the run folder's earlier settings
    (:func:`check_run_folder`; ``force`` starts afresh) and that it can be written.

    Raises:
        WeightsError: The hub is unreachable and weights are not cached (``offline_hint`` says
            what to pass instead).
    """
    from histoclass import preflight
    from histoclass.data.files import check_output, remove_stale_temps
    from histoclass.models.factory import HubError, WeightsError, hub_problem

    cfg.validate()
    hub = [s["model"] for _, s in member_specs(cfg)
           if s.get("pretrained", True) and not (s.get("weights") or cfg.weights.get(s["model"]))]
    problem = hub_problem(hub) if hub else None
    if problem:
        raise WeightsError(f"{problem}; {offline_hint}")
    out = Path(cfg.out)
    preflight.check_run_folder(cfg, force)
    check_output(out, "folder")
    remove_stale_temps(out, recursive=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.__dict__, sort_keys=False))
    manifest = make_manifest(cfg)
    preds: dict[str, list[Path]] = {}
    for fold in _folds(cfg):
        base = out if fold is None else out / f"fold{fold}"
        try:
            members = train_members(cfg, manifest, fold, base)
        except HubError as exc:  # the hub failed mid-run: this command's flags, not train's
            raise WeightsError(f"{exc.reason}; {offline_hint}") from None
        ensembles = build_ensembles(cfg, manifest, fold, base, members)
        for name, csv in predict_test(cfg, manifest, fold, base, members + ensembles).items():
            preds.setdefault(name, []).append(csv)
    summary = evaluate_all(cfg, preds)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(_markdown(summary, cfg))
    return summary


def _markdown(summary: pd.DataFrame, cfg: RunConfig) -> str:
    from histoclass.data.splits import LEAK_NOTE

    lines = []
    if cfg.split.get("protocol") == "paper":
        lines += [f"**{LEAK_NOTE}.** Figures below are not patient-level generalisation.", ""]
    cols = ["model", "kind", *SUMMARY_METRICS]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in summary.iterrows():
        cells = [str(r["model"]), str(r["kind"])]
        for key in SUMMARY_METRICS:
            v, sd = r.get(key), r.get(f"{key}_std")
            cells.append("-" if v is None or pd.isna(v) else
                         f"{v:.3f}" + ("" if sd is None or pd.isna(sd) else f" ± {sd:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
