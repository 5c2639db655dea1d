"""Builders for the issue-12 tests: real read-only and full filesystems, hostile model files."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", readonly: bool = False) -> Iterator[Path]:
    """A real tiny filesystem (tmpfs of ``size``) mounted at ``path``; ``readonly`` remounts it
    read-only. Root can write into a chmod-ed folder, so this is the honest read-only test.
    Skips loudly where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny filesystem needs root (this test checks real ENOSPC/EROFS)")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs",
                          str(path)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Evil:
    """Unpickling this runs a shell command: a model file must never be read with pickle."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/histoclass-pwned",))


def evil_pickle(path: Path) -> Path:
    """A 'checkpoint' that is a malicious pickle (protocol 2: a plain GLOBAL opcode)."""
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil(), "meta": {}}, fh, protocol=2)
    return path


def nan_onnx(path: Path, size: int = 16, meta: dict | None = None) -> Path:
    """A histoclass-style ONNX file whose graph outputs NaN probabilities for any image."""
    import json

    import onnx
    from onnx import TensorProto, helper

    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),  # [N, 3]
        helper.make_node("Slice", ["m", "s0", "s1", "ax"], ["two"]),  # [N, 2]
        helper.make_node("Mul", ["two", "zero"], ["z"]),
        helper.make_node("Div", ["z", "zero"], ["probs"]),  # 0/0 = NaN
    ]
    inits = [zero, helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("s1", TensorProto.INT64, [1], [2]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                     ["N", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    props = {"histoclass": "histoclass-onnx", "classes": json.dumps(["benign", "malignant"]),
             "preprocess": json.dumps({"input_size": [size, size], "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "interpolation": "bilinear"}),
             "stain": "null", "task": "binary", "method": "single", "members": '["nan"]',
             "refer_threshold": "0.25", **(meta or {})}
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def grey(image: np.ndarray) -> np.ndarray:
    """The image as grey RGB: one stain, or none."""
    return np.repeat(image.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
