"""The model card (``README.md``) of a published folder, built with ``huggingface_hub``.

Its metadata is a ``ModelCardData`` whose ``model-index`` holds one ``EvalResult`` per reported
metric, each naming its level (image or patient), its split and split protocol, and its
patient-bootstrap 95% interval; the text says what the model is for (research, not diagnosis),
warns loudly when patients leak between the splits (protocol ``paper``), cites the training
data and says how to load the model with histoclass, with timm alone, and with WSInfer.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

BREAKHIS = ("Spanhol, F. A., Oliveira, L. S., Petitjean, C., Heutte, L. (2016). A Dataset for "
            "Breast Cancer Histopathological Image Classification. IEEE Transactions on "
            "Biomedical Engineering 63(7), 1455-1462. doi:10.1109/TBME.2015.2496264")
STUDY = ("Kalati et al. (2025), Scientific Reports: EfficientNetV1/V2 ensembles with Grad-CAM on "
         "BreakHis (the recipe histoclass starts from; its image-level split lets patients leak)")
LEAK = ("**WARNING: PATIENTS LEAK.** This model was trained or evaluated under the `paper` "
        "protocol: images were split at random, so images of the same patients are in both "
        "the training and the test data. Its numbers overstate how it does on new patients.")


def _fmt(v: Any) -> str:
    return "n/a (undefined)" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _stain(obj: dict[str, Any]) -> str:
    stain = obj.get("stain")
    if not stain:
        return "none"
    if isinstance(stain, dict) and isinstance(stain.get("method"), str):
        return f"`{stain['method']}`"
    return "per member (see histoclass.json)"


def leaks(obj: dict[str, Any]) -> bool:
    """True when the split protocol or the evaluated predictions let patients leak."""
    split, metrics = obj.get("split") or {}, obj.get("metrics") or {}
    return bool(split.get("leaks_patients") or metrics.get("leaks_patients")
                or "paper" in str(split.get("protocol") or ""))


def eval_results(obj: dict[str, Any], dataset: str, task: str) -> list[EvalResult]:
    """One ``EvalResult`` per defined metric: test metrics from ``histoclass evaluate``, or a
    lone member's validation metrics labelled as validation."""
    m, split = obj.get("metrics") or {}, obj.get("split") or {}
    protocol = split.get("protocol") or "unknown"
    args = {"protocol": protocol, "patients_leak": leaks(obj),
            "manifest_sha256": split.get("manifest_sha256")}
    rows: list[tuple[str, Any, str, Any]] = []  # metric, value, level, ci
    if m.get("source") == "histoclass evaluate":
        ci = m.get("ci95") or {}
        rows = [(k, v, "image", ci.get(k)) for k, v in m["image"].items()]
        rows += [(k, v, "patient", ci.get(k)) for k, v in m["patient"].items()]
        where = m.get("split") or "test"
    elif len(m.get("members") or {}) == 1:
        (vals,) = m["members"].values()
        rows = [(k, v, "image", None) for k, v in vals.items() if k != "loss"]
        where = "validation"
    out = []
    for key, value, level, ci in rows:
        if value is None:
            continue
        margs = {"level": level}
        if ci:
            margs.update(ci95_low=ci[0], ci95_high=ci[1],
                         ci_method=f"patient bootstrap ({m.get('bootstrap')} replicates)")
        out.append(EvalResult(
            task_type="image-classification", task_name=f"{task} classification",
            dataset_type=dataset.lower().replace(" ", "-"),
            dataset_name=f"{dataset} ({where} split, {protocol} protocol)",
            dataset_split=where, dataset_args=args, metric_type=key,
            metric_name=f"{key} ({level} level)", metric_value=float(value),
            metric_args={**margs, "source": "histoclass evaluate" if where != "validation" else
                         "histoclass train (validation split, the epoch was selected on it)"}))
    return out


def _metrics_text(obj: dict[str, Any]) -> list[str]:
    m = obj.get("metrics") or {}
    if m.get("source") == "histoclass evaluate":
        lines = [f"Measured by `histoclass evaluate` on the **{m.get('split')}** split "
                 f"({_fmt(m.get('images'))} images, {_fmt(m.get('patients'))} patients), split "
                 f"protocol **{(obj.get('split') or {}).get('protocol') or 'unknown'}**; "
                 + (f"95% intervals: {m['ci_note']}" if m.get("ci_note") else
                    f"95% intervals from {_fmt(m.get('bootstrap'))} bootstrap replicates over "
                    "patients")
                 + (f"; patient-level metrics: {m['patient_note']}" if m.get("patient_note")
                    else "")
                 + (f"; values are the mean over {m['folds']} folds (intervals: the pooled "
                    "out-of-fold predictions)." if m.get("folds") else "."),
                 "", "| metric | level | value | 95% CI (patient bootstrap) |", "|---|---|---|---|"]
        ci = m.get("ci95") or {}
        for level in ("image", "patient"):
            for k, v in m[level].items():
                c = ci.get(k)
                lines.append(f"| {k} | {level} | {_fmt(v)} | "
                             f"{f'{c[0]:.4f} - {c[1]:.4f}' if c else 'n/a'} |")
        return lines
    lines = ["No test evaluation was given (`histoclass publish --metrics metrics.json`). These "
             "are **validation** metrics stored in the checkpoint: the split the best epoch was "
             "chosen on, so they are optimistic; image level only, no intervals.", "",
             "| member | metric | value |", "|---|---|---|"]
    for name, vals in (m.get("members") or {}).items():
        lines += [f"| {name} | {k} | {_fmt(v)} |" for k, v in vals.items()] or \
            [f"| {name} | (none stored) | |"]
    return lines


def _load_text(obj: dict[str, Any], ref: str, folder: str) -> list[str]:
    lines = ["```python", "import histoclass", f'model = histoclass.load("{ref}")',
             'print(model.predict("image.png")[0].probs)', "```", "",
             f"or `histoclass predict {ref} IMAGES --out preds.csv`; `explain`, `export` and "
             f"`serve` take the same name (`local-dir:{folder}` for a local copy).", ""]
    members = [obj] if obj["kind"] == "member" else obj["members"]
    where = [f"local-dir:{folder}"] if obj["kind"] == "member" else \
        [f"local-dir:{folder}/{e['path']}" for e in members]
    lines += ["Without histoclass, with timm alone" + (" (each member):" if len(where) > 1
                                                      else ":"), "", "```python",
              "import timm, torch", "from PIL import Image", f'model = timm.create_model("'
              f'{where[0]}", pretrained=True).eval()',
              "cfg = timm.data.resolve_data_config(model=model)  # squash resize + normalise",
              "x = timm.data.create_transform(**cfg)(Image.open('image.png').convert('RGB'))",
              f"probs = (model(x[None]) / {obj.get('temperature') or 1.0}).softmax(-1)"
              if obj["kind"] == "member" else "probs = (model(x[None]) / T).softmax(-1)  # T: "
              "the member's temperature in its histoclass.json", "```"]
    if obj["kind"] == "ensemble":
        rule = {"soft": "their mean", "hard": "a majority vote", "weighted": "the `weights` "
                "in `histoclass.json`", "stack": "the `stack` logistic regression in "
                "`histoclass.json`", "concat": "the head in `head.safetensors`"}[obj["method"]]
        lines += ["", f"The members are combined by `{obj['method']}` ({rule}), then the "
                  "ensemble's own temperature "
                  f"{obj.get('temperature') or 1.0} rescales the combined probabilities as "
                  "`softmax(log(p) / T)`; histoclass applies both for you."]
    if obj.get("stain"):
        lines += ["", "The images were stain-normalised before the network (the target is in "
                  "`histoclass.json`): histoclass applies it; timm's transform does not."]
    if any(k.startswith("wsinfer/") for k in obj.get("files", {})):
        lines += ["", "WSInfer: `wsinfer run --wsi-dir SLIDES --results-dir OUT --config "
                  "wsinfer/config.json --model-path wsinfer/torchscript_model.pt`."]
    return lines


def _reading_text(obj: dict[str, Any], pre: dict[str, Any] | None) -> str:
    mode = obj.get("input_mode")
    text = (f"Input mode `{mode}`: the whole image is resized (squashed, aspect not kept) to the "
            "input size, then normalised" if mode == "resize" else
            f"Input mode `{mode}` (see histoclass.json)")
    if pre:
        text += (f"; input {pre['input_size'][0]}x{pre['input_size'][1]}, "
                 f"{pre['interpolation']} interpolation, mean {pre['mean']}, std {pre['std']}")
    return text + ". timm's `crop_pct` 1.0 / `crop_mode` squash in `config.json` reproduce it."


def model_card(obj: dict[str, Any], *, dataset: str, license_id: str, repo_id: str | None,
               name: str) -> ModelCard:
    """The card of a published folder whose ``histoclass.json`` content is ``obj``."""
    task = "benign vs malignant" if obj["task"] == "binary" else "breast tumour subtype"
    split = obj.get("split") or {}
    data = ModelCardData(
        model_name=repo_id or name, license=license_id, pipeline_tag="image-classification",
        library_name="timm" if obj["kind"] == "member" else "histoclass",
        tags=["image-classification", "timm", "histoclass", "histopathology", "breast-cancer",
              f"protocol-{split.get('protocol') or 'unknown'}"],
        metrics=sorted({r.metric_type for r in eval_results(obj, dataset, task)}) or None,
        eval_results=eval_results(obj, dataset, task) or None)
    kind = "a single network" if obj["kind"] == "member" else \
        f"an ensemble of {len(obj['members'])} networks combined by `{obj['method']}`"
    archs = [obj["member"]["timm_name"]] if obj["kind"] == "member" else \
        [e["timm_name"] for e in obj["members"]]
    pre = (obj["member"] if obj["kind"] == "member" else {}).get("preprocess")
    body = [f"# {repo_id or name}", ""]
    if leaks(obj):
        body += [f"> {LEAK}", ""]
    body += [f"A [histoclass](https://pypi.org/project/histoclass/) classifier of H&E breast "
             f"histopathology images ({task}: {', '.join(obj['classes'])}): {kind} "
             f"({', '.join(archs)}).", "",
             "## Intended use", "",
             "Research on breast histopathology classification only. **Not a medical device and "
             "not for diagnosis**: its output must never decide a patient's care."
             + (" Images are flagged `refer` (to a pathologist) when the members disagree by "
                f"more than {obj['refer_threshold']}." if obj["kind"] == "ensemble" else ""), "",
             "## Evaluation", "", *_metrics_text(obj), "",
             "## How to load", "", *_load_text(obj, f"hf-hub:{repo_id or 'ORG/NAME'}", name), "",
             "## Preprocessing", "",
             _reading_text(obj, pre), "",
             f"Temperature {obj.get('temperature')}; training resolution "
             f"{obj.get('train_mpp') or 'unknown'} um/px; stain normalisation {_stain(obj)}.",
             "", "## Training data", "",
             f"{dataset}; split protocol **{split.get('protocol') or 'unknown'}** (manifest "
             f"`{split.get('manifest')}`, sha256 `{split.get('manifest_sha256')}`)."
             + ("" if split.get("protocol") else " The training manifest was not found at "
                "publish time, so the protocol is unknown."), ""]
    if dataset.lower().startswith("breakhis"):
        body += [f"Cite the data: {BREAKHIS}.", ""]
    body += [f"The recipe follows {STUDY}.", "", "## Licence", "",
             f"Weights: `{license_id}`. ImageNet initialisation from timm's EfficientNet ports "
             "(Apache-2.0). The training data's own terms of use apply.", "",
             "## Files", "",
             "`histoclass.json` (everything histoclass needs, with the sha256 of every weights "
             "and config file, checked on load), `model.safetensors` + `config.json` (timm's "
             "format) per network, this card.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
