"""Where a backbone comes from, and what a member stores so that it rebuilds offline.

``--model`` takes a member short name or timm name, timm's own ``hf-hub:ORG/NAME`` and
``local-dir:PATH`` prefixes (a folder holding ``config.json`` and ``model.safetensors``, as
``timm.models.save_for_hf`` writes it), or a preset (:mod:`histoclass.models.presets`). A
source's ``config.json`` is read once, at training time, for its architecture name and
constructor arguments; the member stores those (``timm_name``, ``model_args``) plus the
``source``, so predict/explain/export/serve rebuild it without the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from histoclass.models.members import resolve_arch
from histoclass.models.presets import Preset, preset_of

log = logging.getLogger(__name__)
SOURCES = ("hf-hub:", "local-dir:")
# config.json keys a fresh member sets itself (its own head) rather than inherits.
_OWN_KEYS = ("num_classes", "pretrained_cfg", "pretrained_cfg_overlay")


class HubAccessError(ValueError):
    """A hub model that cannot be had: gated and refused, missing, or offline and not cached."""


@dataclass(frozen=True)
class Backbone:
    """A resolved ``--model``: ``timm_name`` and ``model_args`` rebuild it (plain types);
    ``source`` is where pretrained weights come from (``None``: timm's registry)."""

    name: str
    timm_name: str
    model_args: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    embedding: str | None = None
    norm: tuple | None = None

    def meta(self) -> dict[str, Any]:
        """What a member checkpoint records of its backbone (besides ``timm_name``)."""
        return {"model_args": dict(self.model_args), "source": self.source,
                "embedding": self.embedding}


def is_named_backbone(name: str) -> bool:
    """``name`` is a source (``hf-hub:``/``local-dir:``) or a preset, not a timm name."""
    return name.startswith(SOURCES) or preset_of(name) is not None


def hub_url(source: str) -> str:
    """The model page of an ``hf-hub:ORG/NAME[@rev]`` source."""
    return "https://huggingface.co/" + source.removeprefix("hf-hub:").split("@", 1)[0]


def access_error(exc: BaseException, source: str) -> HubAccessError | None:
    """One line for a refused, missing or offline hub download, or ``None`` for other errors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    url, advice = hub_url(source), "or pass --weights FILE"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError) or (isinstance(exc, HfHubHTTPError)
                                           and status in (401, 403)):
        return HubAccessError(
            f"{source}: access refused by the Hugging Face Hub (gated model): accept its "
            f"licence at {url} and run `huggingface-cli login` or set HF_TOKEN; {advice}")
    if isinstance(exc, RepositoryNotFoundError):
        return HubAccessError(
            f"{source}: no such model on the Hugging Face Hub, or access refused: check the "
            f"name at {url}; for a gated model run `huggingface-cli login` or set HF_TOKEN; "
            f"{advice}")
    if isinstance(exc, LocalEntryNotFoundError):
        return HubAccessError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline?): connect once to download it, use local-dir:PATH, {advice}")
    return None


def source_config(source: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, constructor arguments)`` from a source's ``config.json``.

    Raises:
        HubAccessError: The hub refused or could not be reached (:func:`access_error`).
        ValueError: No readable timm ``config.json``, or an architecture timm lacks.
    """
    import timm
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    kind, _, ref = source.partition(":")
    try:
        if kind == "local-dir":
            _, arch, args = load_model_config_from_path(ref)
        else:
            _, arch, args = load_model_config_from_hf(ref)
    except Exception as exc:  # hub client errors come in many types
        err = access_error(exc, source)
        if err is not None:  # before FileNotFoundError: the hub's offline error is one
            raise err from None
        if isinstance(exc, FileNotFoundError):
            raise ValueError(f"{source}: no config.json in {ref} (a folder as timm's "
                             "save_for_hf writes it: config.json + model.safetensors)") from None
        raise ValueError(f"{source}: cannot read its timm config.json "
                         f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
                         ) from None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(f"{source}: config.json names architecture {arch!r}, which this timm "
                         f"({timm.__version__}) does not have")
    return arch, {k: v for k, v in (args or {}).items() if k not in _OWN_KEYS}


def resolve_backbone(name: str, model_args: dict[str, Any] | None = None, *,
                     offline: bool = False) -> Backbone:
    """Resolve ``--model NAME`` (with ``--model-arg`` values, which win) to a :class:`Backbone`.

    Args:
        name: Member short name, timm name, ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or preset.
        model_args: Extra constructor arguments given by the user.
        offline: No hub weights will be downloaded (``--weights FILE`` or
            ``--no-pretrained``): a preset whose architecture is known needs no config.json.

    Raises:
        ValueError: Unknown name, unusable source, or a preset timm cannot build.
    """
    user = dict(model_args or {})
    preset: Preset | None = preset_of(name)
    source = name if name.startswith(SOURCES) else None
    if preset is not None:
        if preset.loader != "timm":
            raise ValueError(f"--model {name}: {preset.hub} is published for {preset.loader}, "
                             "not timm, and histoclass builds timm models only; export it to "
                             "timm (config.json + model.safetensors) and use local-dir:PATH")
        source, user = f"hf-hub:{preset.hub}", {**preset.args, **user}
    if source is None:
        return Backbone(name, resolve_arch(name), user)
    if preset is not None and preset.timm and offline:
        arch, found = preset.timm, {}
    else:
        arch, found = source_config(source)
    args = {**found, **user}
    if args.get("global_pool") == "":  # token output: a classifier head needs one vector
        log.warning("%s: config.json sets global_pool='' (tokens); the classifier pools the "
                    "class token (global_pool='token')", source)
        args["global_pool"] = "token"
    return Backbone(name, arch, args, source, preset.embedding if preset else None,
                    preset.norm if preset else None)
