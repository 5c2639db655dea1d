"""Create a timm backbone with a new head, from hub weights, a local file or from scratch."""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from histoclass.data.transforms import Preprocess
from histoclass.models.checkpoint import load_reason
from histoclass.models.members import resolve_arch
from histoclass.models.model_args import resolve_model_args
from histoclass.models.sources import (
    Backbone,
    access_error,
    is_named_backbone,
    resolve_backbone,
)

log = logging.getLogger(__name__)
HUB_TIMEOUT = 3.0  # seconds the hub gets to answer before a run calls it unreachable


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or does not fit the architecture."""


class HubError(WeightsError):
    """ImageNet weights could not come from the hub; ``reason`` is why, without the advice
    (flags differ between ``train`` and ``demo``, so callers add their own)."""

    def __init__(self, reason: str, advice: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}; {advice}")


TRAIN_ADVICE = "offline, pass --weights FILE (a local weights file) or --no-pretrained"


def _state_dict_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path)
    except WeightsError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise WeightsError(f"{path}: cannot read weights ({load_reason(exc)})") from None


def _skip(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from ``path`` into ``model``, leaving its new head as initialised.

    Keys are matched by name; a file with another naming scheme but the same tensors in the same
    order (EfficientNet-PyTorch ``_conv_stem``/``_blocks`` checkpoints) is matched by order, which
    is only accepted when every shape agrees. Anything else is an error, never a silent random
    initialisation.
    """
    src = {k: v for k, v in read_weights(path).items() if not _skip(k)}
    dst = {k: v for k, v in model.state_dict().items() if not _skip(k)}
    head = {k for k in dst if k.startswith(model.default_cfg.get("classifier", "classifier"))}
    if not set(dst) - head <= set(src):
        src_t, dst_t = list(src.values()), list(dst.values())
        if len(src_t) != len(dst_t) or any(a.shape != b.shape
                                           for a, b in zip(src_t[:-2], dst_t[:-2], strict=False)):
            missing = sorted(set(dst) - head - set(src))
            raise WeightsError(
                f"{path} does not fit {type(model).__name__}: {len(missing)} tensors missing "
                f"(e.g. {missing[:3]}) and the tensors do not line up by order either"
            )
        log.warning("%s: names differ from timm's; matched %d tensors by order", path, len(dst))
        src = dict(zip(dst, src_t, strict=True))
    body = {k: v for k, v in src.items() if k in dst and k not in head}
    bad = [k for k, v in body.items() if v.shape != dst[k].shape]
    if bad:
        raise WeightsError(f"{path}: shape mismatch for {bad[:3]} ({len(bad)} tensors)")
    missing, _ = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if k not in head and not _skip(k)]
    if missing:
        raise WeightsError(f"{path}: weights missing for {missing[:3]} ({len(missing)} tensors)")
    log.info("loaded %d backbone tensors from %s", len(body), path)


def init_head(model: nn.Module) -> None:
    """Glorot-uniform weights and zero bias for the new linear head (Keras' ``Dense`` default).

    timm initialises EfficientNet heads with ``U(+-1/sqrt(fan_out))``, sized for 1000 classes;
    for a 2-class head that is +-0.71, giving initial logits around +-10 on ImageNet features
    and a first epoch spent undoing them. Glorot gives +-0.068 for 1280 features.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)


def create_model(
    arch: str | Backbone,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    drop_rate: float = 0.3,
    model_args: dict | None = None,
) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (global pooling, dropout, linear).

    Args:
        arch: Member short name (``v2-b0``), timm name, ``hf-hub:ORG/NAME``,
            ``local-dir:PATH``, preset (``uni``), or an already resolved
            :class:`~histoclass.models.sources.Backbone`.
        num_classes: Output logits.
        pretrained: Download ImageNet weights from the Hugging Face hub (timm's normal path).
        weights: Local weights file instead of the hub (offline).
        drop_rate: Dropout before the head (0.3 in the study).
        model_args: Extra timm constructor arguments (plain types, see
            :func:`histoclass.models.model_args.parse_model_args`); ignored for a Backbone.
    """
    import timm

    bb = arch if isinstance(arch, Backbone) else resolve_backbone(
        arch, model_args, offline=weights is not None or not pretrained)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate,
              **resolve_model_args(bb.model_args)}
    if bb.norm is not None:  # the preset's published normalisation, whatever the weights' path
        kwargs["pretrained_cfg_overlay"] = {"mean": tuple(bb.norm[0]), "std": tuple(bb.norm[1])}
    if weights is not None:
        model = timm.create_model(bb.timm_name, pretrained=False, **kwargs)
        load_backbone_weights(model, weights)
    elif not pretrained:
        log.warning("%s: no pretrained weights, training from random initialisation", bb.name)
        model = timm.create_model(bb.timm_name, pretrained=False, **kwargs)
    elif bb.source is not None:
        model = _from_source(bb, kwargs)
    else:
        model = _from_hub(bb.timm_name, num_classes, drop_rate, kwargs)
    init_head(model)
    return model


def _from_source(bb: Backbone, kwargs: dict) -> nn.Module:
    """Pretrained weights of an ``hf-hub:``/``local-dir:`` backbone, through timm's own loader
    (the architecture and arguments are already in ``kwargs``, so config.json only adds the
    pretrained configuration: file location, normalisation)."""
    import timm

    try:
        return timm.create_model(bb.source, pretrained=True, **kwargs)
    except Exception as exc:  # hub, network and file errors come in many types
        err = access_error(exc, bb.source)
        if err is not None:
            raise err from None
        raise WeightsError(f"{bb.source}: could not load its pretrained weights "
                           f"({load_reason(exc)})") from None


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """``None`` when the Hugging Face hub answers within ``timeout`` seconds, else why not.

    One HEAD request (through any configured proxy): offline, the hub client would otherwise
    retry for about a minute, printing a line per retry, before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    answer: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                   timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError as exc:  # the hub answers its root; 401/403: it is there
            answer.append(None if exc.code in (401, 403) else f"HTTP {exc.code} from {url}: not "
                          "the hub (a proxy or captive portal?)")
        except (OSError, ValueError) as exc:  # URLError, timeouts, refusals, bad URLs
            answer.append(f"{getattr(exc, 'reason', exc)}")

    # The whole probe gets ``timeout`` seconds (a server trickling bytes cannot stretch it).
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    why = answer[0] if answer else f"no answer within {timeout:g} s"
    return None if why is None else f"cannot reach the Hugging Face hub at {url} ({why})"


def cached_weights(timm_name: str) -> str | None:
    """The already downloaded hub weights file of ``timm_name`` (Hugging Face cache), if any."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    for file in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id, file, cache_dir=cache)
        if isinstance(found, str):
            return found
    return None


def hub_problem(archs: list[str]) -> str | None:
    """Why the ImageNet weights of ``archs`` cannot be had now (hub unreachable and not
    cached), or ``None``: checked in seconds, before a run starts any work."""
    # Presets and hf-hub:/local-dir: sources are checked when they are downloaded.
    names = [resolve_arch(a) for a in archs if not is_named_backbone(a)]
    missing = [n for n in names if cached_weights(n) is None]
    why = hub_unreachable() if missing else None
    return f"{why}; no cached ImageNet weights for {', '.join(missing)}" if why else None


def _from_hub(name: str, num_classes: int, drop_rate: float, extra: dict | None = None
              ) -> nn.Module:
    import timm

    kwargs: dict = {**(extra or {}), "num_classes": num_classes, "drop_rate": drop_rate}
    why = hub_unreachable()
    if why is not None:
        cached = cached_weights(name)
        if cached is None:
            raise HubError(f"{why}; no cached ImageNet weights for {name}", TRAIN_ADVICE)
        log.info("%s; using the cached weights %s", why, cached)
        kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, hub and cache errors come in many types
        raise HubError(f"could not get ImageNet weights for {name} from the Hugging Face hub "
                       f"({load_reason(exc)})", TRAIN_ADVICE) from None


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for ``--device NAME``: the one resolver of every command and the API.

    ``auto`` is this process's GPU when there is one, else the CPU; ``cuda`` is the GPU of
    ``local_rank`` (one per process under ``torchrun``).

    Raises:
        ValueError: An unknown name, or a CUDA device on a machine without CUDA.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def model_preprocess(model: nn.Module, image_size: int | None = None) -> Preprocess:
    """The model's own preprocessing (timm data config), optionally at another size."""
    import timm

    return Preprocess.from_data_config(timm.data.resolve_model_data_config(model), image_size)
