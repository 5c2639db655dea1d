"""``histoclass explain``: CAM figures, a gallery, or a faithfulness table per CAM method."""

from __future__ import annotations

from pathlib import Path

import typer

from histoclass.cli._common import (
    CamMethod,
    Split,
    choices_of,
    fail,
    report_written,
    user_errors,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _is_model(arg: str) -> bool:
    """A checkpoint file, or a published model's name (``local-dir:DIR``, ``hf-hub:ORG/NAME``)."""
    from histoclass.models.published import is_model_ref

    return Path(arg).suffix.lower() in CHECKPOINT_SUFFIXES or is_model_ref(arg)


def _split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    models = [p for p in inputs if _is_model(p)]
    images = [p for p in inputs if not _is_model(p)]
    if not models:
        raise ValueError(f"no checkpoint among {inputs}; the first argument(s) must be "
                         f"model files ({', '.join(CHECKPOINT_SUFFIXES)}) or published models "
                         "(local-dir:DIR, hf-hub:ORG/NAME)")
    return models, images


def _true_label(row: dict, classes: list[str]) -> str:
    """The label (or subtype, for subtype models) a name or folder gives, if it is a class."""
    for label in (row.get("label", ""), row.get("subtype", "")):
        if label in classes:
            return label
    return ""


def _items(images: list[str], manifest: Path | None, split: str, classes: list[str]
           ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(path, true label) for every image given, found in folders, or in the manifest split,
    and the inputs left out as (path, reason)."""
    from histoclass.data.manifest import read_manifest, resolve_data, select
    from histoclass.predict import expand_inputs

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
    info, skipped = expand_inputs([resolve_data(t) for t in images])
    items += [(r["path"], _true_label(r, classes)) for r in info.to_dict("records")]
    if not items:
        raise ValueError("no images: give images/folders after the model(s), or --manifest"
                         + "".join(f"; {p}: {why}" for p, why in skipped))
    return items, skipped


def _model(models: list[str], weights: str | None):
    """One model file as it is, or several member checkpoints as a soft (or, with
    ``--ensemble-weights``, weighted) ensemble."""
    from histoclass.models import ensemble_of, load_model_file

    loaded = [load_model_file(p) for p in models]
    if len(loaded) == 1:
        return loaded[0]
    for path, ens in zip(models, loaded, strict=True):
        if ens.is_ensemble:
            raise ValueError(f"{path} is an ensemble file: explain it alone, not with other "
                             f"checkpoints ({', '.join(models)})")
    ws = [float(w) for w in weights.split(",")] if weights else None
    return ensemble_of([e.members[0] for e in loaded], models, ws)


def explain(
    inputs: list[str] = typer.Argument(
        ..., metavar="MODEL... [IMAGES]...",
        help="MODEL.pt [MODEL2.pt ...] (or local-dir:DIR, hf-hub:ORG/NAME) then images or "
        "folders ('sample:breakhis' works)."
    ),
    out: Path = typer.Option(None, "--out", help="Folder for the figures (<name>.cam.png), "
                             "overlays and index.html; required unless --score."),
    manifest: Path = typer.Option(None, help="Explain the images of one split of this manifest."),
    split: Split = typer.Option("test", help="Split of --manifest."),
    method: CamMethod = typer.Option("gradcam", help="Class activation map method."),
    klass: str = typer.Option("predicted", "--class", help="predicted | benign | malignant "
                              "(or any class of the model)."),
    layer: str = typer.Option(None, help="Target layer name (default: bn2 for EfficientNet, "
                              "blocks[-1].norm1 for a ViT); 'list' prints each member's "
                              "candidates and exits."),
    ensemble_weights: str = typer.Option(
        None, help="Comma-separated weights for several member checkpoints (soft ensemble)."
    ),
    alpha: float = typer.Option(0.6, help="Overlay opacity where the map is 1; it falls with "
                                "the map, so low regions show the tissue unchanged."),
    maps: bool = typer.Option(False, "--maps", help="Also write each (fused) map as "
                              "<name>.cam.npy: float32 in [0, 1] at the image's resolution."),
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
    from histoclass.models import CheckpointError

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if out is None and not score and layer != "list":  # before loading anything
        fail("--out DIR is required (or use --score)")
    if score and set(chosen) - set(choices_of(CamMethod)):
        fail(f"unknown method(s) {sorted(set(chosen) - set(choices_of(CamMethod)))}; choose "
             f"from {', '.join(choices_of(CamMethod))}")
    with user_errors(ImageLoadError, CheckpointError):
        if out is not None and not score and layer != "list":
            from histoclass.data.files import check_output

            check_output(out, "folder")  # before any model is loaded or CAM computed
        models, images = _split_inputs(inputs)
        ens = _model(models, ensemble_weights)
        if layer == "list":
            _list_layers(ens)
            return
        items, skipped = _items(images, manifest, split, ens.classes)
        if score:
            _score(ens, items, chosen, klass, layer, steps, road)
            return
        from histoclass.explain import explain_batch
        from histoclass.explain.gallery import written_files

        logging.getLogger("histoclass").setLevel(logging.INFO)
        result = explain_batch(ens, items, out, method=method, target=klass, layer=layer,
                               alpha=alpha, maps=maps, skipped=skipped,
                               progress=len(items) > 1)
    for name, why in result.skipped:
        typer.secho(f"skipped {name}: {why}", fg=typer.colors.YELLOW)
    wrong = sum(r["correct"] == "no" for r in result.rows)
    typer.echo(f"explained {len(result.rows)} image(s) ({wrong} misclassified), skipped "
               f"{len(result.skipped)}; open {result.gallery}")
    report_written(written_files(out, result))


def _list_layers(ens) -> None:
    from histoclass.explain import candidate_layers, find_target_layer

    for m in ens.members:
        default, _ = find_target_layer(m.model)
        names = ", ".join(candidate_layers(m.model))
        typer.echo(f"{m.name}: default {default}; candidates {names}")


def _score(ens, items, chosen, klass, layer, steps, road) -> None:
    from histoclass.data.images import ImageLoadError, load_rgb, to_array
    from histoclass.explain import format_table, score_methods

    images = []
    for path, _ in items:
        try:
            images.append(to_array(load_rgb(path)))
        except ImageLoadError as exc:
            typer.secho(f"skipped {exc}", fg=typer.colors.YELLOW)
    if not images:
        raise ValueError("no readable images to score")
    from histoclass.models.tiles import input_of

    for m in ens.members:
        if input_of(m.meta).tiles:  # its maps are stitched from tiles the scorer never cuts
            raise ValueError(f"faithfulness scoring perturbs one resized input; member {m.name} "
                             "reads native-resolution tiles (--input tiles): not supported, "
                             "explain it without scoring")
        rows = score_methods(m.model, m.preprocess, images, ens.classes, chosen, target=klass,
                             layer=layer, steps=steps, road=road, stain=m.stain)
        typer.echo(f"{m.name}: faithfulness on {len(images)} image(s) (higher insertion and "
                   "ins_minus_del, lower deletion = more faithful; compare with random)")
        typer.echo(format_table(rows))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the CLI."""
    app.command()(explain)
