"""Tests for the exact graph rewrites of the PP-OCR models (``edge.readers.graph``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import rapidocr_onnxruntime
from onnx import TensorProto, helper, numpy_helper

from edge.readers.graph import rewrite, rewritten_models

MODELS = Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"
RNG = np.random.default_rng(3)


def run(model: Any, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    return result


def constant(name: str, value: np.ndarray) -> Any:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name)
    )


def scalar(name: str, value: float) -> Any:
    return constant(name, np.array([value], dtype=np.float32))


def model_of(nodes: list[Any], channels: int = 4) -> Any:
    """Build a model with input ``x`` and output ``y`` of shape 1 x channels x 8 x 8."""
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def conv(name: str, source: str, output: str, kernel: int, pads: int) -> list[Any]:
    weights = RNG.normal(size=(4, 4, kernel, kernel)).astype(np.float32)
    bias = RNG.normal(size=4).astype(np.float32)
    return [
        constant(f"{name}.w", weights),
        constant(f"{name}.b", bias),
        helper.make_node(
            "Conv", [source, f"{name}.w", f"{name}.b"], [output], name=name, pads=[pads] * 4
        ),
    ]


def affine(name: str, source: str, output: str, scale: float, shift: float) -> list[Any]:
    return [
        scalar(f"{name}.s", scale),
        scalar(f"{name}.t", shift),
        helper.make_node("Mul", [source, f"{name}.s"], [f"{name}.m"]),
        helper.make_node("Add", [f"{name}.m", f"{name}.t"], [output]),
    ]


def hard_swish(name: str, source: str, output: str) -> list[Any]:
    return [
        scalar(f"{name}.three", 3.0),
        scalar(f"{name}.zero", 0.0),
        scalar(f"{name}.six", 6.0),
        helper.make_node("Add", [source, f"{name}.three"], [f"{name}.a"]),
        helper.make_node("Clip", [f"{name}.a", f"{name}.zero", f"{name}.six"], [f"{name}.c"]),
        helper.make_node("Mul", [source, f"{name}.c"], [f"{name}.m"]),
        helper.make_node("Div", [f"{name}.m", f"{name}.six"], [output]),
    ]


def op_types(model: Any) -> list[str]:
    return [node.op_type for node in model.graph.node if node.op_type != "Constant"]


def assert_same_function(original: Any, rewritten: Any) -> None:
    inputs = RNG.normal(scale=4.0, size=(1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(rewritten, inputs), run(original, inputs), atol=1e-4)


def test_rewrite_block_of_all_patterns() -> None:
    """A PP-LCNetV3-like block: padded conv, affine, hard-swish, affine, 1x1 conv, affine."""
    nodes = [
        *conv("dw", "x", "c1", kernel=3, pads=1),
        *affine("lab1", "c1", "a1", 1.3, -0.2),
        *hard_swish("act", "a1", "h1"),
        *affine("lab2", "h1", "a2", 0.7, 0.4),
        *conv("pw", "a2", "c2", kernel=1, pads=0),
        *affine("lab3", "c2", "y", 0.9, 0.1),
    ]
    original = model_of(nodes)
    rewritten = model_of(nodes)
    counts = rewrite(rewritten)
    onnx.checker.check_model(rewritten)

    assert counts.conv_then_affine == 2
    assert counts.affine_then_conv == 1
    assert counts.hard_swish == 1
    assert op_types(rewritten) == ["Conv", "HardSigmoid", "Mul", "Conv"]
    assert_same_function(original, rewritten)


def test_rewrite_keeps_affine_before_padded_conv() -> None:
    """Folding a shift into a padded convolution would change the border outputs."""
    nodes = [*affine("lab", "x", "a", 1.5, 0.5), *conv("dw", "a", "y", kernel=3, pads=1)]
    original = model_of(nodes)
    rewritten = model_of(nodes)
    counts = rewrite(rewritten)

    assert counts.total == 0
    assert op_types(rewritten) == ["Mul", "Add", "Conv"]
    assert_same_function(original, rewritten)


def test_rewrite_keeps_conv_output_read_twice() -> None:
    """A convolution whose output another node also reads is not folded."""
    nodes = [
        *conv("c", "x", "c1", kernel=1, pads=0),
        *affine("lab", "c1", "a1", 2.0, 1.0),
        helper.make_node("Add", ["a1", "c1"], ["y"]),
    ]
    original = model_of(nodes)
    rewritten = model_of(nodes)

    assert rewrite(rewritten).total == 0
    assert_same_function(original, rewritten)


def test_rewrite_keeps_clip_of_other_bounds() -> None:
    """A Clip to 0..1 is not a hard-swish and stays as it is."""
    nodes = [
        scalar("three", 3.0),
        scalar("zero", 0.0),
        scalar("one", 1.0),
        scalar("six", 6.0),
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "one"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["y"]),
    ]
    rewritten = model_of(nodes)

    assert rewrite(rewritten).hard_swish == 0
    assert op_types(rewritten) == ["Add", "Clip", "Mul", "Div"]


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
        ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 96, 128)),
    ],
)
def test_rewrite_ppocr_model_same_outputs(name: str, shape: tuple[int, ...]) -> None:
    original = onnx.load(str(MODELS / name))
    rewritten = onnx.load(str(MODELS / name))
    counts = rewrite(rewritten)
    onnx.checker.check_model(rewritten)
    inputs = RNG.uniform(-1.0, 1.0, size=shape).astype(np.float32)

    assert counts.hard_swish >= 20
    assert counts.conv_then_affine >= 20
    assert len(rewritten.graph.node) < len(original.graph.node) * 0.6
    np.testing.assert_allclose(run(rewritten, inputs), run(original, inputs), atol=1e-4)


def test_rewritten_models_in_child_process(tmp_path: Path) -> None:
    path = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    models = rewritten_models([path], tmp_path)

    assert models == [tmp_path / path.name]
    loaded = onnx.load(str(models[0]))
    onnx.checker.check_model(loaded)
    inputs = RNG.uniform(-1.0, 1.0, size=(1, 3, 48, 192)).astype(np.float32)
    np.testing.assert_allclose(run(loaded, inputs), run(onnx.load(str(path)), inputs), atol=1e-4)


def test_rewritten_models_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "missing.onnx"
    with caplog.at_level(logging.WARNING, logger="edge.readers.graph"):
        models = rewritten_models([missing], tmp_path)

    assert models is None
    assert "using the original models" in caplog.text
    assert "missing.onnx" in caplog.text


def test_rewritten_models_missing_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    with caplog.at_level(logging.WARNING, logger="edge.readers.graph"):
        models = rewritten_models([path], tmp_path / "absent")

    assert models is None
    assert "exited with status" in caplog.text


def test_rewrite_keeps_scalar_of_higher_rank() -> None:
    """A one-element constant of rank 5 broadcasts the result to rank 5, so it stays."""
    nodes = [
        *conv("c", "x", "c1", kernel=1, pads=0),
        constant("s", np.full((1, 1, 1, 1, 1), 2.0, dtype=np.float32)),
        scalar("t", 1.0),
        helper.make_node("Mul", ["c1", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    model = model_of(nodes)
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 8, 8])
    )

    assert rewrite(model).total == 0
    assert op_types(model) == ["Conv", "Mul", "Add"]


def test_rewrite_skips_graph_with_subgraph() -> None:
    branch_nodes = [*conv("c", "x", "c1", kernel=1, pads=0), *affine("lab", "c1", "out", 2.0, 1.0)]
    branch = helper.make_graph(
        branch_nodes, "branch", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    )
    nodes = [
        constant("flag", np.array(True)),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
    ]
    model = model_of(nodes)

    assert rewrite(model).total == 0
    assert op_types(model) == ["If"]


def test_rewritten_models_ignore_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module in the working directory cannot shadow one the rewriting child imports."""
    (tmp_path / "numpy.py").write_text("raise ImportError('numpy shadowed')\n", "utf-8")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    output.mkdir()

    models = rewritten_models([MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"], output)

    assert models is not None
    assert len(models) == 1
