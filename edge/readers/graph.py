"""Exact rewrites of the PP-OCR ONNX graphs that onnxruntime's own optimiser does not make.

rapidocr's PP-OCRv4 models were exported from PaddlePaddle op by op. Their backbone (PP-LCNetV3)
scales and shifts every convolution's output by two learned scalars (a ``Mul`` and an ``Add``
node), and writes each hard-swish activation as four nodes (``Add``, ``Clip``, ``Mul``,
``Div``). onnxruntime runs each of those nodes as a pass over the whole feature map, and they
took about 30% of the recogniser's time in an onnxruntime profile (x86-64, one thread).

:func:`rewrite` removes them without changing the function the model computes:

- ``Conv -> Mul(s) -> Add(b)`` becomes one ``Conv`` with weights ``W * s`` and bias
  ``B * s + b``.
- ``Mul(s) -> Add(b) -> Conv`` becomes one ``Conv`` when that convolution has no padding
  (padding would then add ``b`` at the borders): weights ``W * s``, bias ``B + b * sum(W)``.
- ``x * Clip(x + 3, 0, 6) / 6`` becomes ``x * HardSigmoid(x)`` with alpha 1/6 and beta 1/2,
  which is the same function in two nodes rather than four.

Outputs differ from the original graph's by float rounding only (about 1e-6).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class RewriteCounts:
    """Number of patterns :func:`rewrite` replaced, by kind."""

    conv_then_affine: int
    affine_then_conv: int
    hard_swish: int

    @property
    def total(self) -> int:
        """All replacements together."""
        return self.conv_then_affine + self.affine_then_conv + self.hard_swish


class _Graph:
    """Index of an ONNX graph's nodes, constants and tensor consumers, for local rewrites."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        # Nodes are tracked by id(), so this list keeps one wrapper object per node alive.
        self.nodes: list[Any] = list(self.graph.node)
        self.constants: dict[str, FloatArray] = {}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for initializer in self.graph.initializer:
            self.constants[initializer.name] = numpy_helper.to_array(initializer)
        self.removed: set[int] = set()
        self.graph_outputs = {output.name for output in self.graph.output}
        self._index()

    def _index(self) -> None:
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            if id(node) in self.removed:
                continue
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, tensor: str, op_type: str) -> Any | None:
        """Return the single live node that reads ``tensor`` if it is an ``op_type`` node."""
        if tensor in self.graph_outputs:
            return None
        readers = [n for n in self.consumers.get(tensor, []) if id(n) not in self.removed]
        if len(readers) != 1 or readers[0].op_type != op_type:
            return None
        return readers[0]

    def scalar(self, name: str) -> float | None:
        """Return the value of a one-element constant of rank 0 or 1, or ``None``.

        A constant of higher rank could raise the rank of the result by broadcasting, which a
        fold would lose.
        """
        value = self.constants.get(name)
        if value is None or value.size != 1 or value.ndim > 1:
            return None
        return float(value.reshape(-1)[0])

    def add_constant(self, name: str, value: FloatArray) -> str:
        """Add a float32 initializer and return its name."""
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.constants[name] = value
        return name

    def remove(self, nodes: Iterable[Any]) -> None:
        self.removed.update(id(node) for node in nodes)
        self._index()

    def finish(self) -> None:
        """Drop removed nodes, then constants and initializers nothing reads any more."""
        from onnx import NodeProto

        live_nodes = [node for node in self.nodes if id(node) not in self.removed]
        used = {name for node in live_nodes for name in node.input} | self.graph_outputs
        copies = []
        for node in live_nodes:
            if node.op_type != "Constant" or node.output[0] in used:
                copy = NodeProto()
                copy.CopyFrom(node)
                copies.append(copy)
        del self.graph.node[:]
        self.graph.node.extend(copies)
        initializers = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(initializers)


def rewrite(model: Any) -> RewriteCounts:
    """Rewrite an ``onnx.ModelProto`` in place (see the module docstring); return the counts.

    A graph with subgraphs (``If``, ``Loop``) is left as it is, because the consumer index
    does not see the tensors those subgraphs read.
    """
    from onnx import AttributeProto

    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                return RewriteCounts(0, 0, 0)
    graph = _Graph(model)
    conv_then_affine = _fold_conv_then_affine(graph)
    affine_then_conv = _fold_affine_then_conv(graph)
    hard_swish = _fuse_hard_swish(graph)
    graph.finish()
    return RewriteCounts(conv_then_affine, affine_then_conv, hard_swish)


def _scalar_affine(graph: _Graph, mul: Any) -> tuple[str, float, float, Any] | None:
    """Match ``Mul(x, s) -> Add(., b)`` with scalar constants; return (x, s, b, the Add)."""
    scalars = [name for name in mul.input if graph.scalar(name) is not None]
    if len(mul.input) != 2 or len(scalars) != 1:
        return None
    source = mul.input[0] if mul.input[1] == scalars[0] else mul.input[1]
    add = graph.only_consumer(mul.output[0], "Add")
    if add is None or len(add.input) != 2:
        return None
    other = add.input[0] if add.input[1] == mul.output[0] else add.input[1]
    shift = graph.scalar(other)
    if shift is None:
        return None
    scale = graph.scalar(scalars[0])
    assert scale is not None
    return source, scale, shift, add


def _conv_weights(graph: _Graph, conv: Any) -> tuple[FloatArray, FloatArray] | None:
    if len(conv.input) < 2 or conv.input[1] not in graph.constants:
        return None
    weights = graph.constants[conv.input[1]].astype(np.float32)
    if len(conv.input) > 2 and conv.input[2]:
        if conv.input[2] not in graph.constants:
            return None
        bias = graph.constants[conv.input[2]].astype(np.float32)
    else:
        bias = np.zeros(weights.shape[0], dtype=np.float32)
    return weights, bias


def _set_conv_weights(graph: _Graph, conv: Any, weights: FloatArray, bias: FloatArray) -> None:
    data = conv.input[0]
    # A convolution may be folded twice (with the affine before and after it).
    stem = f"{conv.name or conv.output[0]}.folded{len(graph.graph.initializer)}"
    del conv.input[:]
    conv.input.extend(
        [
            data,
            graph.add_constant(f"{stem}.w", weights),
            graph.add_constant(f"{stem}.b", bias),
        ]
    )


def _fold_conv_then_affine(graph: _Graph) -> int:
    count = 0
    for conv in graph.nodes:
        if conv.op_type != "Conv" or id(conv) in graph.removed:
            continue
        mul = graph.only_consumer(conv.output[0], "Mul")
        params = _conv_weights(graph, conv)
        if mul is None or params is None:
            continue
        match = _scalar_affine(graph, mul)
        if match is None or match[0] != conv.output[0]:
            continue
        _, scale, shift, add = match
        weights, bias = params
        _set_conv_weights(graph, conv, weights * scale, bias * scale + shift)
        conv.output[0] = add.output[0]
        graph.remove([mul, add])
        count += 1
    return count


def _has_padding(conv: Any) -> bool:
    for attribute in conv.attribute:
        if attribute.name == "pads" and any(attribute.ints):
            return True
        if attribute.name == "auto_pad" and attribute.s not in (b"", b"NOTSET", b"VALID"):
            return True
    return False


def _fold_affine_then_conv(graph: _Graph) -> int:
    count = 0
    for mul in graph.nodes:
        if mul.op_type != "Mul" or id(mul) in graph.removed:
            continue
        match = _scalar_affine(graph, mul)
        if match is None:
            continue
        source, scale, shift, add = match
        conv = graph.only_consumer(add.output[0], "Conv")
        if conv is None or conv.input[0] != add.output[0] or _has_padding(conv):
            continue
        params = _conv_weights(graph, conv)
        if params is None:
            continue
        weights, bias = params
        folded_bias = bias + shift * weights.sum(axis=(1, 2, 3))
        conv.input[0] = source
        _set_conv_weights(graph, conv, weights * scale, folded_bias)
        graph.remove([mul, add])
        count += 1
    return count


def _fuse_hard_swish(graph: _Graph) -> int:
    from onnx import helper

    count = 0
    for clip in graph.nodes:
        if clip.op_type != "Clip" or id(clip) in graph.removed or len(clip.input) != 3:
            continue
        if graph.scalar(clip.input[1]) != 0.0 or graph.scalar(clip.input[2]) != 6.0:
            continue
        add = next((n for n in graph.nodes if clip.input[0] in n.output), None)
        if add is None or add.op_type != "Add" or graph.scalar(add.input[1]) != 3.0:
            continue
        source = add.input[0]
        mul = graph.only_consumer(clip.output[0], "Mul")
        if graph.only_consumer(add.output[0], "Clip") is None or mul is None:
            continue
        if sorted(mul.input) != sorted([source, clip.output[0]]):
            continue
        div = graph.only_consumer(mul.output[0], "Div")
        if div is None or div.input[0] != mul.output[0] or graph.scalar(div.input[1]) != 6.0:
            continue
        gate = f"{div.output[0]}.hard_sigmoid"
        add.CopyFrom(
            helper.make_node(
                "HardSigmoid", [source], [gate], name=f"{div.name}.hs", alpha=1 / 6, beta=0.5
            )
        )
        div.CopyFrom(helper.make_node("Mul", [source, gate], [div.output[0]], name=div.name))
        graph.remove([clip, mul])
        count += 1
    return count


def rewrite_files(paths: Sequence[Path], folder: Path) -> list[Path]:
    """Load each ONNX model file, rewrite it and save it under its own name in ``folder``.

    Returns:
        The paths of the rewritten models, in the order of ``paths``.

    Raises:
        ImportError: If the ``onnx`` package is missing.
        OSError: If a file cannot be read or written.
        onnx.checker.ValidationError: If a rewritten model is not a valid ONNX model.
    """
    import onnx

    outputs = []
    for path in paths:
        model = onnx.load(str(path))
        counts = rewrite(model)
        onnx.checker.check_model(model)
        logger.debug("%s: %s", path.name, counts)
        output = folder / path.name
        onnx.save(model, str(output))
        outputs.append(output)
    return outputs


def rewritten_models(
    paths: Sequence[Path], folder: Path, timeout: float = 120.0
) -> list[Path] | None:
    """Rewrite ONNX model files into ``folder`` in a child process.

    The ``onnx`` package adds about 16 MB to a process that imports it, and loading and
    rewriting a model makes copies of its weights, so a short-lived child process does the
    rewriting and the daemon keeps none of that memory. The models go through files because
    an onnxruntime session created from bytes keeps a copy of them for its lifetime.

    Returns:
        The paths of the rewritten models, in the order of ``paths``, or ``None`` on
        failure (``onnx`` missing, an unreadable model, a timeout), which is logged as a
        warning so that the caller keeps the original models.
    """
    # -P keeps the working directory (the service's state directory) off sys.path. This
    # package's root goes last, so an installed copy and the standard library come first.
    root = str(Path(__file__).resolve().parents[2])
    program = (
        f"import sys; sys.path.append({root!r}); "
        "from edge.readers.graph import main; sys.exit(main())"
    )
    command = [sys.executable, "-P", "-c", program, str(folder), *map(str, paths)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("OCR model rewrite failed (%s); using the original models", exc)
        return None
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        logger.warning(
            "OCR model rewrite exited with status %d (%s); using the original models",
            done.returncode,
            reason[0],
        )
        return None
    outputs = [folder / path.name for path in paths]
    missing = [str(output) for output in outputs if not output.is_file()]
    if missing:
        logger.warning(
            "OCR model rewrite wrote no %s; using the original models", ", ".join(missing)
        )
        return None
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the model files named on the command line into the folder named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m edge.readers.graph FOLDER MODEL.onnx...", file=sys.stderr)
        return 2
    rewrite_files([Path(arg) for arg in args[1:]], Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
