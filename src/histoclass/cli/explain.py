"""``histoclass explain``: CAM figures, a gallery, or a faithfulness table per CAM method."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import user_errors

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    models = [p for p in inputs if Path(p).suffix.lower() in CHECKPOINT_SUFFIXES]
    images = [p for p in inputs if Path(p).suffix.lower() not in CHECKPOINT_SUFFIXES]
    if not models:
        raise ValueError(f"no checkpoint among {inputs}; the first argument(s) must be "
                         f"model files ({', '.join(CHECKPOINT_SUFFIXES)})")
    return models, images


def _true_label(path: Path, classes: list[str]) -> str:
    from histoclass.data.breakhis import label_from_folder, parse_name

    try:
        parsed = parse_name(path.name)
    except ValueError:
        parsed = None
    found = label_from_folder(path.parent.name)
    for label in ((parsed.label, parsed.subtype) if parsed else ()) + (found or ()):
        if label in classes:
            return label
    return ""


def _items(images: list[str], manifest: Path | None, split: str,
           classes: list[str]) -> list[tuple[str, str]]:
    """(path, true label) for every image given, found in folders, or in the manifest split."""
    from histoclass.data.images import IMAGE_SUFFIXES
    from histoclass.data.manifest import read_manifest, resolve_data, select

    items: list[tuple[str, str]] = []
    if manifest is not None:
        rows = select(read_manifest(manifest), split)
        if rows.empty:
            raise ValueError(f"manifest {manifest} has no {split!r} images")
        # Subtype models are judged against the manifest's subtype column.
        col = "label" if set(classes) <= set(rows["label"]) | {"benign", "malignant"} else "subtype"
        labels = rows[col] if col in rows.columns else [""] * len(rows)
        items += [(p, lab if lab in classes else "") for p, lab in zip(rows["path"], labels,
                                                                       strict=True)]
    for text in images:
        path = resolve_data(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no images found (looked for "
                                 f"{', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [(str(p), _true_label(p, classes)) for p in found]
        elif path.exists():
            items.append((str(path), _true_label(path, classes)))
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    if not items:
        raise ValueError("no images: give images/folders after the model(s), or --manifest")
    return items


def _members(models: list[str], weights: str | None):
    """Member checkpoints as explain.Member tuples, with their shared class names."""
    from histoclass.explain_ensemble import load_member

    ws = [1.0] * len(models)
    if weights:
        ws = [float(w) for w in weights.split(",")]
        if len(ws) != len(models):
            raise ValueError(f"--ensemble-weights has {len(ws)} value(s) for {len(models)} "
                             "model(s); give one weight per checkpoint")
    members, classes = [], None
    for path, w in zip(models, ws, strict=True):
        if _is_ensemble(path):
            if len(models) > 1:
                raise ValueError(f"{path} is an ensemble file: explain it alone, not with "
                                 f"other checkpoints ({', '.join(models)})")
            from histoclass.explain_ensemble import ensemble_members
            from histoclass.models.ensemble import load_model_file

            ens = load_model_file(path)
            members, fuse = ensemble_members(ens)
            return members, list(ens.classes), fuse
        member, meta = load_member(path, w)
        if classes is not None and meta["classes"] != classes:
            raise ValueError(f"{path}: classes {meta['classes']} differ from {classes} of "
                             f"{models[0]}; ensemble members must share classes")
        classes = meta["classes"]
        members.append(member)
    return members, classes, None


def _is_ensemble(path: str) -> bool:
    import torch

    from histoclass.models.ensemble import FORMAT

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file: load_member below names the problem
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def explain(
    inputs: list[str] = typer.Argument(
        ..., help="MODEL.pt [MODEL2.pt ...] then images or folders ('sample:breakhis' works)."
    ),
    out: Path = typer.Option(None, "--out", help="Folder for figures, overlays and index.html."),
    manifest: Path = typer.Option(None, help="Explain the images of one split of this manifest."),
    split: str = typer.Option("test", help="Split of --manifest."),
    method: str = typer.Option("gradcam", help="gradcam | gradcam++ | hirescam | eigencam | "
                               "layercam."),
    klass: str = typer.Option("predicted", "--class", help="predicted | benign | malignant "
                              "(or any class of the model)."),
    layer: str = typer.Option(None, help="Target layer name (default: bn2 for EfficientNet)."),
    ensemble_weights: str = typer.Option(
        None, help="Comma-separated weights for several member checkpoints (soft ensemble)."
    ),
    alpha: float = typer.Option(0.4, help="Overlay opacity."),
    score: bool = typer.Option(False, "--score", help="Print a faithfulness table (deletion/"
                               "insertion per method) instead of writing figures."),
    methods: str = typer.Option("gradcam,gradcam++,hirescam,eigencam,layercam",
                                help="Methods compared by --score."),
    road: bool = typer.Option(False, help="Add grad-cam's ROAD score to --score (slow)."),
    steps: int = typer.Option(8, help="Deletion/insertion steps for --score."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default). On a busy "
                                "shared machine 1 can be many times faster."),
) -> None:
    """Explain predictions with class activation maps (Grad-CAM and friends)."""
    import logging

    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from histoclass.data.images import ImageLoadError

    with user_errors(ImageLoadError):
        models, images = _split_inputs(inputs)
        members, classes, fuse = _members(models, ensemble_weights)
        items = _items(images, manifest, split, classes)
        if score:
            _score(members, classes, items, methods, klass, layer, steps, road)
            return
        if out is None:
            raise ValueError("--out DIR is required (or use --score)")
        from histoclass.explain_gallery import explain_batch

        logging.getLogger("histoclass").setLevel(logging.INFO)
        result = explain_batch(members, classes, items, out, method=method, target=klass,
                               layer=layer, alpha=alpha, progress=len(items) > 1, fuse=fuse)
    for name, why in result.skipped:
        typer.secho(f"skipped {name}: {why}", fg=typer.colors.YELLOW)
    wrong = sum(r["correct"] == "no" for r in result.rows)
    typer.echo(f"explained {len(result.rows)} image(s) ({wrong} misclassified), skipped "
               f"{len(result.skipped)}; gallery: {result.gallery}")


def _score(members, classes, items, methods, klass, layer, steps, road) -> None:
    from histoclass.data.images import ImageLoadError, load_rgb, to_array
    from histoclass.explain import METHODS
    from histoclass.faithfulness import format_table, score_methods

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    images = []
    for path, _ in items:
        try:
            images.append(to_array(load_rgb(path)))
        except ImageLoadError as exc:
            typer.secho(f"skipped {exc}", fg=typer.colors.YELLOW)
    if not images:
        raise ValueError("no readable images to score")
    for m in members:
        rows = score_methods(m.model, m.preprocess, images, classes, chosen, target=klass,
                             layer=layer, steps=steps, road=road, stain=m.stain)
        typer.echo(f"{m.name}: faithfulness on {len(images)} image(s) (higher insertion and "
                   "ins_minus_del, lower deletion = more faithful; compare with random)")
        typer.echo(format_table(rows))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(explain)
