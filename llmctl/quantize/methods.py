"""The int8 and int4 quantizers: ONNX model in, quantized ONNX model out.

Both handle the two tensors that generic tools skip. The output head is quantized even when
its weight is tied to the embedding, and the embedding lookup becomes a GatherBlockQuantized
(an ONNX Runtime contrib op). When the head is a MatMulNBits with the same bits as the
embedding, the lookup reads the head's quantized tensor, so the tied matrix is stored once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import ConversionError, UsageError

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclass
class QuantizeSettings:
    """The parameters of one quantization run, with the profile's defaults filled in."""

    method: str
    mode: str = "weight-only"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    algorithm: str = "rtn"
    per_channel: bool = False
    quantize_embeddings: bool = True
    head_bits: int | None = None

    @property
    def bits(self) -> int:
        return 4 if self.method == "int4" else 8

    def parameters(self) -> dict[str, Any]:
        """Return the settings that take effect for this method and mode, for the manifest."""
        dynamic = self.method == "int8" and self.mode == "dynamic"
        effective: dict[str, Any] = {"method": self.method, "mode": self.mode, "quantize_embeddings": self.quantize_embeddings}
        if dynamic:
            effective["per_channel"] = self.per_channel
        else:
            effective.update(algorithm=self.algorithm, accuracy_level=self.accuracy_level, head_bits=self.head_bits)
        if not dynamic or self.quantize_embeddings:
            # Dynamic quantization uses them for the embedding's GatherBlockQuantized only.
            effective.update(block_size=self.block_size, symmetric=self.symmetric)
        return effective


@dataclass
class QuantizeReport:
    """Record of the changes a quantizer made to the graph, for the manifest."""

    quantized_nodes: int = 0
    head: str = "float"
    embedding: str = "float"
    shared_embedding: bool = False
    float_tensors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EmbeddingLayout:
    """Nodes of the token embedding and the output head in the graph."""

    gather: Any = None  # the Gather node of the embedding lookup
    transpose: Any = None  # Transpose(head weight) feeding the Gather, for tied weights
    head: Any = None  # the MatMul node of the output head
    embedding_name: str | None = None  # the [vocab, hidden] initializer, when not tied


def find_embedding_layout(model) -> EmbeddingLayout:
    """Locate the embedding Gather, the output-head MatMul and a Transpose that ties them."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    layout = EmbeddingLayout()

    for node in graph.node:
        if node.op_type != "Gather" or "input_ids" not in node.input[1:]:
            continue
        data = node.input[0]
        if data in initializers and len(initializers[data].dims) == 2:
            layout.gather, layout.embedding_name = node, data
        elif data in producers and producers[data].op_type == "Transpose" and producers[data].input[0] in initializers:
            layout.gather, layout.transpose = node, producers[data]
        break

    vocab = None
    if layout.embedding_name:
        vocab = initializers[layout.embedding_name].dims[0]
    elif layout.transpose is not None:
        vocab = initializers[layout.transpose.input[0]].dims[1]
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            dims = list(initializers[node.input[1]].dims)
            if len(dims) == 2 and (dims[1] == vocab or (vocab is None and "lm_head" in node.name)):
                layout.head = node
    return layout


def _weight_only_config(settings: QuantizeSettings, bits: int):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    if settings.algorithm == "hqq":
        if bits != 4:
            raise UsageError("the hqq algorithm quantizes to 4 bits only", hint="use --algorithm rtn for int8")
        return mnq.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits)
    if settings.algorithm == "k_quant":
        if bits != 4:
            raise UsageError("the k_quant algorithm quantizes to 4 bits only", hint="use --algorithm rtn for int8")
        # NOTE: k-quant picks its own block layout; --block-size and --symmetric do not apply to it.
        return mnq.KQuantWeightOnlyQuantConfig()
    return mnq.DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size, is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=bits,
    )


def _matmul_nbits(model, settings: QuantizeSettings, bits: int, *, include: list[str] | None = None, exclude: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, block_size=settings.block_size, is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
        nodes_to_exclude=exclude or [], nodes_to_include=include, algo_config=_weight_only_config(settings, bits),
    )
    quantizer.process()
    return quantizer.model.model


def _ensure_named(model) -> None:
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def _replace_initializer_users(graph, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _remove_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def block_quantize_rows(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a [rows, cols] matrix in blocks along its columns, packed as GatherBlockQuantized reads it.

    Returns:
        ``(data, scales, zero_points)``: uint8 data of shape [rows, cols * bits / 8] (two 4-bit
        values per byte, low nibble first), scales of shape [rows, cols / block_size], and
        uint8 zero points packed like the data (None when symmetric, where the op's default
        zero point 2^(bits-1) applies).
    """
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block_size, block_size).astype(np.float32)
    levels = (1 << bits) - 1
    middle = 1 << (bits - 1)
    if symmetric:
        absmax = np.abs(blocks).max(axis=-1, keepdims=True)
        scales = absmax / (middle - 0.5 if bits == 4 else middle - 1)
        scales = np.where(scales == 0, 1.0, scales)
        quantized = np.clip(np.rint(blocks / scales) + middle, 0, levels).astype(np.uint8)
        zero_points = None
    else:
        low = np.minimum(blocks.min(axis=-1, keepdims=True), 0)
        high = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
        scales = (high - low) / levels
        scales = np.where(scales == 0, 1.0, scales)
        zero = np.clip(np.rint(-low / scales), 0, levels).astype(np.uint8)
        quantized = np.clip(np.rint(blocks / scales) + zero, 0, levels).astype(np.uint8)
        zero_points = zero.reshape(rows, -1)
    quantized = quantized.reshape(rows, cols)
    if bits == 4:
        quantized = quantized[:, 0::2] | (quantized[:, 1::2] << 4)
        if zero_points is not None:
            if zero_points.shape[1] % 2:
                zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    return quantized, scales.reshape(rows, -1).astype(weight.dtype), zero_points


def _gather_block_quantized(graph, gather, data: str, scales: str, zero_points: str | None, bits: int, block_size: int) -> None:
    import onnx

    inputs = [data, gather.input[1], scales] + ([zero_points] if zero_points else [])
    node = onnx.helper.make_node(
        "GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "/GatherBlockQuantized", domain=MS_DOMAIN,
        bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
    )
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(position, node)


def _share_head_with_embedding(model, layout: EmbeddingLayout, bits: int, block_size: int) -> bool:
    """Point the embedding lookup at the quantized head tensor of a tied model.

    MatMulNBits stores its weight transposed, as [N = vocab, K / block, block * bits / 8] uint8,
    which is the [vocab, hidden * bits / 8] row layout GatherBlockQuantized reads.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == layout.head.output[0]), None)
    if head is None:
        return False
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    if attributes.get("bits") != bits or attributes["K"] % block_size:
        return False

    # GatherBlockQuantized takes packed integer zero points only; HQQ writes float ones.
    initializers = {t.name: t for t in graph.initializer}
    if len(head.input) > 3 and head.input[3]:
        zero_points = initializers.get(head.input[3])
        if zero_points is None or zero_points.data_type != onnx.TensorProto.UINT8:
            return False

    vocab, hidden = attributes["N"], attributes["K"]
    reshaped = []
    for index, width in ((1, hidden * bits // 8), (2, hidden // block_size), (3, -(-(hidden // block_size) * bits // 8))):
        if index >= len(head.input) or not head.input[index]:
            reshaped.append(None)
            continue
        shape_name = f"/model/embed_tokens/shape_{index}"
        graph.initializer.append(numpy_helper.from_array(np.array([vocab, width], dtype=np.int64), shape_name))
        output = f"{head.input[index]}/as_embedding"
        graph.node.insert(0, onnx.helper.make_node("Reshape", [head.input[index], shape_name], [output], name=output))
        reshaped.append(output)
    _gather_block_quantized(graph, layout.gather, reshaped[0], reshaped[1], reshaped[2], bits, block_size)
    graph.node.remove(layout.transpose)
    _remove_unused_initializers(graph)
    return True


def _quantize_embedding_alone(model, layout: EmbeddingLayout, bits: int, block_size: int, symmetric: bool) -> bool:
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    if layout.embedding_name:
        weight = numpy_helper.to_array(initializers[layout.embedding_name])
        base = layout.embedding_name
    else:
        source = layout.transpose.input[0]
        weight = numpy_helper.to_array(initializers[source]).T
        base = "model.embed_tokens.weight"
    if weight.shape[1] % block_size or weight.dtype not in (np.float32, np.float16):
        return False
    data, scales, zero_points = block_quantize_rows(weight, bits, block_size, symmetric)
    graph.initializer.append(numpy_helper.from_array(data, f"{base}_Q{bits}"))
    graph.initializer.append(numpy_helper.from_array(scales, f"{base}_scales"))
    if zero_points is not None:
        graph.initializer.append(numpy_helper.from_array(zero_points, f"{base}_zero_points"))
    _gather_block_quantized(
        graph, layout.gather, f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points" if zero_points is not None else None, bits, block_size,
    )
    if layout.transpose is not None:
        graph.node.remove(layout.transpose)
    _remove_unused_initializers(graph)
    return True


def float_tensors(model, min_elements: int = 1024) -> list[dict[str, Any]]:
    """List the float initializers with at least ``min_elements`` elements (norm weights are smaller)."""
    import onnx

    result = []
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if count >= min_elements:
            result.append({"name": tensor.name, "shape": list(tensor.dims), "dtype": onnx.TensorProto.DataType.Name(tensor.data_type).lower()})
    return result


class WeightOnlyQuantizer:
    """Block-wise MatMulNBits weight-only quantization, with the head and embedding included."""

    name = "weight-only"

    def quantize_model(self, model, settings: QuantizeSettings):
        """Quantize ``model`` (a ModelProto) and return ``(model, report)``."""
        _ensure_named(model)
        layout = find_embedding_layout(model)
        head_bits = settings.head_bits or settings.bits
        report = QuantizeReport()

        exclude = [layout.head.name] if layout.head is not None and head_bits != settings.bits else []
        model = _matmul_nbits(model, settings, settings.bits, exclude=exclude)
        if exclude:
            model = _matmul_nbits(model, settings, head_bits, include=exclude)
        report.quantized_nodes = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
        layout = find_embedding_layout(model) if layout.head is None else _refresh_layout(model, layout)
        if layout.head is not None:
            report.head = f"int{head_bits} MatMulNBits"

        if settings.quantize_embeddings and layout.gather is not None:
            shared = False
            if layout.transpose is not None and layout.head is not None and head_bits == settings.bits:
                shared = _share_head_with_embedding(model, layout, head_bits, settings.block_size)
            if shared:
                report.embedding, report.shared_embedding = f"int{head_bits} GatherBlockQuantized (shared with the head)", True
            elif _quantize_embedding_alone(model, layout, settings.bits, settings.block_size, settings.symmetric):
                report.embedding = f"int{settings.bits} GatherBlockQuantized"
        report.float_tensors = float_tensors(model)
        return model, report


def _refresh_layout(model, old: EmbeddingLayout) -> EmbeddingLayout:
    """Find the same nodes again after the quantizer rebuilt the node list."""
    names = {node.name: node for node in model.graph.node}
    by_output = {node.output[0]: node for node in model.graph.node}
    return EmbeddingLayout(
        gather=names.get(old.gather.name) if old.gather is not None else None,
        transpose=names.get(old.transpose.name) if old.transpose is not None else None,
        head=by_output.get(old.head.output[0]) if old.head is not None else None,
        embedding_name=old.embedding_name,
    )


class Int4Quantizer(WeightOnlyQuantizer):
    """int4: block-wise MatMulNBits (RTN by default; HQQ and k-quant on request)."""

    name = "int4"


class Int8Quantizer(WeightOnlyQuantizer):
    """int8: 8-bit MatMulNBits weight-only, or ONNX Runtime dynamic quantization (QDQ-free MatMulInteger)."""

    name = "int8"

    def quantize_model(self, model, settings: QuantizeSettings):
        if settings.mode == "weight-only":
            return super().quantize_model(model, settings)
        return self._dynamic(model, settings)

    def _dynamic(self, model, settings: QuantizeSettings):
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        from llmctl.convert.onnx_files import load_model, save_model

        _ensure_named(model)
        report = QuantizeReport()
        layout = find_embedding_layout(model)
        if settings.quantize_embeddings and layout.gather is not None:
            if _quantize_embedding_alone(model, layout, 8, settings.block_size, settings.symmetric):
                report.embedding = "int8 GatherBlockQuantized"
        with tempfile.TemporaryDirectory(prefix="llmctl-int8-") as scratch:
            source, target = Path(scratch) / "in.onnx", Path(scratch) / "out.onnx"
            save_model(model, source)
            try:
                quantize_dynamic(
                    source, target, weight_type=QuantType.QInt8, per_channel=settings.per_channel,
                    op_types_to_quantize=["MatMul"], use_external_data_format=True,
                    extra_options={"MatMulConstBOnly": True},
                )
            except (ValueError, RuntimeError) as error:
                raise ConversionError(f"ONNX Runtime dynamic quantization failed: {error}") from error
            model = load_model(target)
        report.quantized_nodes = sum(1 for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
        if layout.head is not None:
            report.head = "int8 dynamic (per-channel)" if settings.per_channel else "int8 dynamic"
        report.float_tensors = float_tensors(model)
        return model, report
