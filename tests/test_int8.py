"""INT8 export: what is quantised, what stays float, the graph passes, and ensembles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from helpers_predict import make_member
from histoclass.data.manifest import sample_path
from histoclass.deploy.export import export_onnx
from histoclass.deploy.graph import float_nodes, spatial_means_to_pool, stem_convs
from histoclass.deploy.runtime import OnnxClassifier

SAMPLES = sorted(sample_path("breakhis").glob("*.png"))
vi = helper.make_tensor_value_info


def producers(graph) -> dict[str, str]:
    return {o: n.op_type for n in graph.node for o in n.output}


@pytest.fixture(scope="module")
def member8(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return export_onnx(make_member(root / "m.pt"), root / "m.onnx", int8=True)


def test_member_body_is_int8_and_ends_are_float(member8):
    graph = onnx.load(str(member8)).graph
    producer = producers(graph)
    (stem,) = stem_convs(onnx.load(str(member8)))
    node = {n.name: n for n in graph.node}
    assert producer[node[stem].input[0]] != "DequantizeLinear"  # the stem reads float pixels
    # SiLU and squeeze-excitation run in int8: every Sigmoid reads a dequantised tensor (ORT
    # fuses DQ -> op -> Q into QLinearSigmoid / QLinearMul), and the spatial means became
    # GlobalAveragePool; the classifier and the softmax stay float.
    sig = [n for n in graph.node if n.op_type == "Sigmoid"]
    assert sig and all(producer[n.input[0]] == "DequantizeLinear" for n in sig)
    assert "GlobalAveragePool" in producer.values() and "ReduceMean" not in producer.values()
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    inits = {t.name for t in graph.initializer}
    assert gemm.input[1] in inits  # float weights, not a dequantised int8 tensor
    (soft,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert producer[soft.input[0]] == "Gemm"
    clf, fp32 = OnnxClassifier(member8, threads=1), OnnxClassifier(
        member8.with_name("m.fp32.onnx"), threads=1)
    x = fp32.preprocess_paths(SAMPLES)
    p8, p32 = clf.predict_batch(x), fp32.predict_batch(x)
    assert np.allclose(p8.sum(1), 1, atol=1e-5)
    assert np.abs(p8 - p32).max() < 0.05  # a random tiny net: loose, but not arbitrary


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})


def test_spatial_means_become_global_pools():
    """Only a keepdims mean over H, W of a 4-D tensor is rewritten; values are unchanged."""
    ints = TensorProto.INT64
    inits = [helper.make_tensor("hw", ints, [2], [2, 3]),
             helper.make_tensor("neg", ints, [2], [-2, -1]),
             helper.make_tensor("chw", ints, [3], [1, 2, 3])]
    nodes = [helper.make_node("ReduceMean", ["x", "hw"], ["a"], keepdims=1),
             helper.make_node("Constant", [], ["k"], value_ints=[-1, -2]),
             helper.make_node("ReduceMean", ["x", "k"], ["b"]),  # keepdims defaults to 1
             helper.make_node("ReduceMean", ["x", "hw"], ["c"], keepdims=0),
             helper.make_node("ReduceMean", ["x", "chw"], ["d"], keepdims=1),
             helper.make_node("ReduceMean", ["y", "neg"], ["e"], keepdims=1)]  # 3-D: no
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3, 4, 5]),
                                           vi("y", TensorProto.FLOAT, [2, 3, 4])],
                              [vi(o, TensorProto.FLOAT, None) for o in "abcde"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 3, 4, 5)).astype(np.float32),
             "y": rng.normal(size=(2, 3, 4)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert spatial_means_to_pool(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["GlobalAveragePool", "Constant", "GlobalAveragePool", "ReduceMean",
                   "ReduceMean", "ReduceMean"]
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-6)


def test_spatial_means_attribute_axes_and_unused_constants():
    """Before opset 18 ``axes`` is an attribute; initializers left unused are dropped."""
    spare = numpy_helper.from_array(np.zeros(3, np.float32), "spare")
    node = helper.make_node("ReduceMean", ["x"], ["a"], axes=[2, 3])
    graph = helper.make_graph([node], "g", [vi("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [vi("a", TensorProto.FLOAT, None)], [spare])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3)
    before = _run(model, x)
    assert spatial_means_to_pool(model) == 1 and not model.graph.initializer
    assert np.allclose(_run(model, x)[0], before[0])


def test_float_nodes_keep_stem_and_classifier_only():
    """A dense layer inside the body (an MLP) is quantised; the classifier (one output per
    class) and all after it, and the stem with all before it, stay float."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [helper.make_node("Mul", ["x", "scale"], ["xn"], name="norm"),
             helper.make_node("Conv", ["xn", "w_stem"], ["s"], name="stem"),
             helper.make_node("Conv", ["s", "w_c1"], ["c1"], name="c1"),
             helper.make_node("Transpose", ["c1"], ["t"], perm=[0, 2, 3, 1], name="nhwc"),
             helper.make_node("MatMul", ["t", "w_mlp"], ["m"], name="mlp"),
             helper.make_node("Sigmoid", ["m"], ["g"], name="act"),
             helper.make_node("ReduceMean", ["g", "axes"], ["p"], keepdims=0, name="pool"),
             helper.make_node("Gemm", ["p", "w_fc"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax")]
    inits = [numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "scale"),
             w("w_stem", 4, 3, 1, 1), w("w_c1", 4, 4, 1, 1), w("w_mlp", 4, 4),
             w("w_fc", 2, 4), numpy_helper.from_array(np.array([1, 2], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [vi("probs", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert float_nodes(model, 2) == ["fc", "norm", "softmax", "stem"]


@pytest.mark.parametrize("method", ["hard", "concat"])
def test_ensembles_quantise_members_and_keep_the_rule_float(tmp_path, method):
    from histoclass.models import ensemble as ens

    a = make_member(tmp_path / "a.pt", seed=1)
    b = make_member(tmp_path / "b.pt", seed=2, size=48)  # resized inside the graph
    members = [ens.load_member(p, p.stem) for p in (a, b)]
    head = None
    if method == "concat":
        from histoclass.models.concat import ConcatHead

        torch.manual_seed(0)
        head = ConcatHead(sum(m.model.num_features for m in members), 2).eval()
    ens.Ensemble(members, method, head=head, member_paths=[a, b]).save(tmp_path / "e.pt")
    int8 = export_onnx(tmp_path / "e.pt", tmp_path / "e.onnx", int8=True)
    graph = onnx.load(str(int8)).graph
    producer = producers(graph)
    assert len(stem_convs(onnx.load(str(int8)))) == 2
    assert sum(op == "DequantizeLinear" for op in producer.values()) > 20  # both bodies
    # Every output (probabilities, members' softmax, disagreement) comes from float ops.
    assert not {producer[o.name] for o in graph.output} & {"DequantizeLinear",
                                                           "QuantizeLinear"}
    c8, c32 = OnnxClassifier(int8, threads=1), OnnxClassifier(
        int8.with_name("e.fp32.onnx"), threads=1)
    x = c8.preprocess_paths(SAMPLES)
    (p8, m8, d8), (p32, m32, _) = c8.run_batch(x), c32.run_batch(x)
    assert m8.shape == (2, len(SAMPLES), 2) and d8.shape == (len(SAMPLES),)
    assert np.allclose(p8.sum(1), 1, atol=1e-5)
    assert np.abs(m8 - m32).max() < 0.05  # members: the quantisation error only
    if method == "concat":  # a float head on quantised features (a hard vote may flip)
        assert np.abs(p8 - p32).max() < 0.05
