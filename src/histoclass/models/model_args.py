"""Extra timm constructor arguments (``--model-arg KEY=VALUE``): parsed plain-typed so a
checkpoint stores them as JSON-like values, and class names resolved from an allow-list only
(never evaluated) when the model is rebuilt."""

from __future__ import annotations

from typing import Any

# Class-valued constructor arguments (``--model-arg mlp_layer=SwiGLUPacked``): stored by name
# in a checkpoint and resolved from this allow-list only, never evaluated.
CLASS_ARGS: dict[str, tuple[str, str]] = {
    "SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SwiGLU": ("timm.layers", "SwiGLU"),
    "Mlp": ("timm.layers", "Mlp"), "SiLU": ("torch.nn", "SiLU"), "GELU": ("torch.nn", "GELU")}
CLASS_KEYS = ("mlp_layer", "act_layer", "norm_layer")


def parse_model_args(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["key=value", ...]`` as plain-typed constructor arguments: values are JSON scalars
    (``true``, ``1e-5``, ``"avg"``), anything else a string.

    Raises:
        ValueError: A pair without ``=``, or a class-valued key naming a class outside
            :data:`CLASS_ARGS`.
    """
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg {pair!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return check_model_args(out)


def check_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` if every value is a plain scalar and every class name is allowed (an unknown
    class fails at parse time, not when a checkpoint is loaded)."""
    for key, value in args.items():
        if not isinstance(key, str) or not (value is None or isinstance(value,
                                                                        str | int | float)):
            raise ValueError(f"model argument {key}={value!r}: the value must be a scalar "
                             "(number, true/false, text)")
    resolve_model_args(args)
    return args


def resolve_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Stored constructor arguments with class names (``mlp_layer``, ``act_layer``...) mapped
    to their classes through :data:`CLASS_ARGS`."""
    import importlib

    out = dict(args)
    for key in CLASS_KEYS:
        if isinstance(name := out.get(key), str):
            if name not in CLASS_ARGS:
                raise ValueError(f"model argument {key}={name!r} is not an allowed class; "
                                 f"use one of {', '.join(CLASS_ARGS)}")
            module, attr = CLASS_ARGS[name]
            out[key] = getattr(importlib.import_module(module), attr)
    return out
