"""Small ONNX graph passes: the file's metadata, and preparing a model for INT8 quantisation.

The passes work in place on an ``onnx.ModelProto``. They find the parts that must stay float (the
pixels' path into each stem, and the classifier with all that follows it) and rewrite the one
pattern ORT cannot run in int8 (a spatial ``ReduceMean``) into its int8-capable equivalent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's ``metadata_props`` as a dict."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def set_metadata(path: str | Path, meta: dict[str, str]) -> None:
    """Replace the file's ``metadata_props`` with ``meta``."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name (quantisation excludes nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if n.name:
            continue
        name, k = f"{n.op_type}_{i}", 0
        while name in used:
            k += 1
            name = f"{n.op_type}_{i}_{k}"
        n.name = name
        used.add(name)


def stem_convs(model: Any) -> list[str]:
    """Names of the Conv nodes reading RGB (3 input channels): every member's stem."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv"
            and len(weights.get(n.input[1], ())) == 4 and weights[n.input[1]][1] == 3]


def _const_ints(model: Any, name: str) -> list[int] | None:
    """The integer values of initializer or ``Constant`` ``name``; None if it is neither."""
    from onnx import helper, numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).ravel()]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if "value" in attrs:
                return [int(v) for v in numpy_helper.to_array(attrs["value"]).ravel()]
            if "value_ints" in attrs:
                return [int(v) for v in attrs["value_ints"]]
            if "value_int" in attrs:
                return [int(attrs["value_int"])]
    return None


def _ranks(model: Any) -> dict[str, int]:
    """Tensor name -> rank, where shape inference knows it."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos
            if v.type.tensor_type.HasField("shape")}


def spatial_means_to_pool(model: Any) -> int:
    """Rewrite ``ReduceMean`` over H, W (``keepdims=1``) of 4-D tensors to the equivalent
    ``GlobalAveragePool``, which has an int8 kernel in ORT. Unused constants are dropped.

    Returns:
        The number of nodes rewritten.
    """
    from onnx import helper

    ranks = _ranks(model)
    count = 0
    for i, n in enumerate(model.graph.node):
        if n.op_type != "ReduceMean" or ranks.get(n.input[0]) != 4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")  # an attribute before opset 18, an input since
        if axes is None and len(n.input) > 1 and n.input[1]:
            axes = _const_ints(model, n.input[1])
        if attrs.get("keepdims", 1) != 1 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name)
        model.graph.node[i].CopyFrom(pool)
        count += 1
    drop_unused_initializers(model)
    return count


def drop_unused_initializers(model: Any) -> None:
    """Remove initializers no node reads (ORT warns about each one otherwise)."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {v.name for v in (*model.graph.input, *model.graph.output)}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _out_width(node: Any, weights: dict[str, Any]) -> int | None:
    """Output features of a Gemm/MatMul whose second input is a 2-D initializer."""
    from onnx import helper

    dims = weights.get(node.input[1]) if len(node.input) > 1 else None
    if dims is None or len(dims) != 2:
        return None
    trans_b = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("transB", 0)
    return int(dims[0] if node.op_type == "Gemm" and trans_b else dims[1])


def classifier_heads(model: Any, num_classes: int) -> list[str]:
    """Gemm/MatMul nodes with ``num_classes`` outputs: each member's classifier (and a concat
    head). Dense layers inside a body (MLPs, attention) have other widths."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")
            and _out_width(n, weights) == num_classes]


def float_nodes(model: Any, num_classes: int) -> list[str]:
    """Names of the nodes to keep float: each stem conv and everything feeding it (input
    normalisation, ensemble resizes), and each classifier with everything after it (logits,
    softmax, the ensemble rule). Nodes must be uniquely named (:func:`name_nodes`)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: dict[int, Any] = {}

    def walk(start: list[Any], step: Any) -> None:
        stack = list(start)
        while stack:
            n = stack.pop()
            if id(n) not in keep:
                keep[id(n)] = n
                stack += step(n)

    stems, heads = set(stem_convs(model)), set(classifier_heads(model, num_classes))
    if not heads:
        log.warning("INT8: no classifier with %d outputs found; every dense layer is "
                    "quantised", num_classes)
    walk([n for n in model.graph.node if n.name in stems],
         lambda n: [producer[i] for i in n.input if i in producer])
    walk([n for n in model.graph.node if n.name in heads],
         lambda n: [c for o in n.output for c in consumers.get(o, [])])
    return sorted(n.name for n in keep.values())
