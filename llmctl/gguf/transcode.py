"""Carry a GGUF file's quantized blocks into the float ONNX graph converted from it.

The convert step exports the dequantized model with the ONNX Runtime GenAI model builder
(fp32). This module then replaces each ``MatMul`` whose weight came from a quantized GGUF
tensor with a ``MatMulNBits`` holding that tensor's own codes, scales and minimums, and the
embedding ``Gather`` with a ``GatherBlockQuantized`` where the operator can represent the
format. No value is rounded a second time: every replacement is checked against the float
weight it replaces before the graph is written.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import ConversionError, UnsupportedError, UsageError
from llmctl.gguf import blocks, names
from llmctl.gguf.reader import GGUFFile, read_gguf

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
FALLBACKS = ("error", "requantize")
REQUANTIZE_TYPE = "Q8_0"  # closest supported format to the float values: 8-bit codes, block 32
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Relative difference allowed between a decoded GGUF weight and the float initializer it
# replaces. Both come from the same blocks, so only float rounding separates them.
MATCH_TOLERANCE = 1e-5


@dataclass
class TensorRecord:
    """A manifest entry: one GGUF tensor, its block type and the ONNX weight it became."""

    gguf_tensor: str
    gguf_type: str
    onnx_weight: str
    became: str


@dataclass
class TranscodeReport:
    """The outcome of ``transcode``: per-tensor records and totals for the summary."""

    architecture: str
    tensors: list[TensorRecord] = field(default_factory=list)
    fallback: str = "error"
    requantized: list[str] = field(default_factory=list)
    accuracy_level: int = 0

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in self.tensors:
            counts[record.became] = counts.get(record.became, 0) + 1
        return {
            "architecture": self.architecture,
            "accuracy_level": self.accuracy_level,
            "fallback": self.fallback,
            "requantized": self.requantized,
            "counts": counts,
            "tensors": [asdict(record) for record in self.tensors],
        }


def describe(weight: blocks.BlockWeight, op: str = "MatMulNBits") -> str:
    """Return a short description of a converted weight (``MatMulNBits 4-bit block 32, float zero points``)."""
    text = f"{op} {weight.bits}-bit block {weight.block_size}"
    if weight.zero_point_kind != "default":
        text += f", {weight.zero_point_kind} zero points"
    if weight.offsets is not None:
        text += ", block offsets"
    return text


@dataclass
class _Component:
    gguf_name: str
    type_name: str
    weight: blocks.BlockWeight | None  # None: the tensor stays float


def transcode(
    model_dir: Path,
    gguf_path: Path,
    *,
    fallback: str = "error",
    accuracy_level: int = 0,
) -> TranscodeReport:
    """Replace the float weights of a GenAI-builder ONNX graph with the GGUF's quantized blocks.

    The folder is rewritten in place (``model.onnx`` and ``model.onnx.data``); call it on the
    staging folder of an atomic output.

    Args:
        model_dir: folder with the builder's fp32 ``model.onnx`` converted from ``gguf_path``.
        gguf_path: the GGUF file the float graph was dequantized from.
        fallback: ``"error"`` rejects a block type or architecture that cannot be carried
            exactly. ``"requantize"`` quantizes those weights again from the float graph into
            Q8_0 blocks and lists them in the report.
        accuracy_level: ``MatMulNBits`` accuracy level. 0 and 1 compute in float and keep the
            products equal to the dequantized ones; 4 quantizes activations to int8 on CPU
            (faster, no longer exact for integer zero points).

    NOTE: with onnxruntime 1.32 on CPU, 8-bit ``MatMulNBits`` at accuracy level 0 takes a slow
    path (about 340 ms for SmolLM2's 49152 x 576 Q8_0 output head, 5 ms at level 4), so a
    transcoded model with an 8-bit head decodes at a few tokens/s until this is addressed.

    Returns:
        The per-tensor record of what each GGUF tensor became.

    Raises:
        UsageError: an unknown fallback or accuracy level.
        UnsupportedError: an architecture or block type that cannot be carried exactly,
            with ``fallback="error"``.
        InputError: the GGUF file is missing, truncated or corrupt.
        ConversionError: the graph does not match the GGUF file.
    """
    import onnx

    if fallback not in FALLBACKS:
        raise UsageError(f"unknown GGUF fallback {fallback!r}", hint=f"choose one of: {', '.join(FALLBACKS)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"invalid MatMulNBits accuracy level {accuracy_level}", hint="choose 0, 1, 2, 3 or 4")

    gguf_file = read_gguf(gguf_path)
    spec = _architecture_or_none(gguf_file.architecture, fallback)
    model_path = Path(model_dir) / MODEL_FILE
    if not model_path.is_file():
        raise ConversionError(f"{model_path} not found", hint="transcoding needs the GenAI builder's fp32 graph")
    if spec is not None:
        _check_block_types(gguf_file, fallback)

    model = onnx.load(str(model_path), load_external_data=True)
    graph = _Graph(model)
    report = TranscodeReport(architecture=gguf_file.architecture, fallback=fallback, accuracy_level=accuracy_level)
    components = _gguf_components(gguf_file)
    matmuls = _replace_matmuls(graph, gguf_file, spec, components, report)
    _replace_embedding(graph, gguf_file, components, matmuls, report)
    if not report.tensors:
        raise ConversionError(
            f"{model_path}: no MatMul weight of the graph matches a tensor of {gguf_path}",
            hint="transcoding works on the GenAI builder's fp32 graph of the same model",
        )
    graph.finish()
    _save(model, Path(model_dir))
    logger.info("transcoded %d GGUF tensors into %s", len(report.tensors), model_path)
    return report


def check_transcodable(gguf_path: Path, fallback: str = "error") -> str:
    """Check, before any export work, that a GGUF file's quantization can be carried over.

    Args:
        gguf_path: the GGUF file.
        fallback: ``"error"`` or ``"requantize"``, as for ``transcode``.

    Returns:
        The file's GGUF architecture.

    Raises:
        UsageError: an unknown fallback.
        InputError: the file is missing, truncated or corrupt.
        UnsupportedError: with ``fallback="error"``, an architecture without a name mapping or
            a block type that cannot be carried exactly.
    """
    if fallback not in FALLBACKS:
        raise UsageError(f"unknown GGUF fallback {fallback!r}", hint=f"choose one of: {', '.join(FALLBACKS)}")
    gguf_file = read_gguf(gguf_path)
    if _architecture_or_none(gguf_file.architecture, fallback) is not None:
        _check_block_types(gguf_file, fallback)
    return gguf_file.architecture


def summarize(report: TranscodeReport) -> dict[str, Any]:
    """Return the totals of a report for a convert summary (the per-tensor list left out)."""
    summary = report.to_dict()
    summary.pop("tensors")
    return summary


def _architecture_or_none(architecture: str, fallback: str) -> names.ArchitectureSpec | None:
    try:
        return names.architecture_spec(architecture)
    except UnsupportedError:
        if fallback == "requantize":
            logger.warning("GGUF architecture %s has no name mapping: requantizing every MatMul weight", architecture)
            return None
        raise


def _check_block_types(gguf_file: GGUFFile, fallback: str) -> None:
    """Reject, before any work, a mapped tensor whose block type has no exact decoder."""
    if fallback == "requantize":
        return
    for tensor in gguf_file.tensors.values():
        if names.component_key(tensor.name) is None or tensor.type_name in FLOAT_TYPES:
            continue
        if tensor.type_name not in blocks.SUPPORTED_TYPES:
            raise UnsupportedError(
                f"GGUF tensor {tensor.name} uses block type {tensor.type_name}, which cannot be carried into "
                f"MatMulNBits exactly (supported: {', '.join(blocks.SUPPORTED_TYPES)})",
                hint="pass --gguf-fallback requantize, or --dtype fp32 to dequantize",
            )


def _gguf_components(gguf_file: GGUFFile) -> dict[str, str]:
    """Map builder component keys to GGUF tensor names; a tied head maps to the embedding."""
    components = {}
    for name in gguf_file.tensors:
        key = names.component_key(name)
        if key is not None:
            components[key] = name
    if names.OUTPUT_HEAD not in components and names.EMBEDDING in components:
        components[names.OUTPUT_HEAD] = components[names.EMBEDDING]
    return components


def _decode_component(
    gguf_file: GGUFFile, spec: names.ArchitectureSpec | None, gguf_name: str, float_rows: np.ndarray
) -> _Component:
    """Decode one GGUF tensor in Hugging Face row order, or requantize it from ``float_rows``."""
    tensor = gguf_file.tensors[gguf_name]
    if tensor.type_name in FLOAT_TYPES:
        return _Component(gguf_name, tensor.type_name, None)
    if spec is None or tensor.type_name not in blocks.SUPPORTED_TYPES:
        requantized = _requantize(float_rows)
        return _Component(gguf_name, tensor.type_name, requantized)

    weight = blocks.decode(tensor.type_name, tensor.data)
    order = names.row_order(
        spec,
        gguf_name,
        weight.shape[0],
        int(gguf_file.arch_value("attention.head_count", 0)),
        int(gguf_file.arch_value("attention.head_count_kv", gguf_file.arch_value("attention.head_count", 0))),
    )
    if order is not None:
        weight = weight.select_rows(order)
    _check_match(gguf_name, weight, float_rows)
    return _Component(gguf_name, tensor.type_name, weight)


def _requantize(float_rows: np.ndarray) -> blocks.BlockWeight:
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(np.ascontiguousarray(float_rows, dtype=np.float32), GGMLQuantizationType[REQUANTIZE_TYPE])
    return blocks.decode(REQUANTIZE_TYPE, raw)


def _check_match(gguf_name: str, weight: blocks.BlockWeight, float_rows: np.ndarray) -> None:
    """Raise ConversionError unless the decoded blocks equal the float weight they replace."""
    if weight.shape != float_rows.shape:
        raise ConversionError(
            f"GGUF tensor {gguf_name} has shape {weight.shape}, the graph's weight {float_rows.shape}",
            hint="convert the graph from the same GGUF file",
        )
    decoded = weight.dequantize()
    scale = max(float(np.abs(float_rows).max()), 1e-30)
    difference = float(np.abs(decoded - float_rows).max()) / scale
    if difference > MATCH_TOLERANCE:
        raise ConversionError(
            f"GGUF tensor {gguf_name} does not match the graph's float weight (max relative difference {difference:.3g})",
            hint="convert the graph from the same GGUF file with the GenAI builder",
        )


def _replace_matmuls(
    graph: _Graph,
    gguf_file: GGUFFile,
    spec: names.ArchitectureSpec | None,
    components: dict[str, str],
    report: TranscodeReport,
) -> dict[str, blocks.BlockWeight]:
    """Turn every builder MatMul backed by quantized GGUF tensors into MatMulNBits nodes.

    Returns:
        The merged block weight of each replaced MatMul, by builder component key.
    """
    replaced = {}
    for node in list(graph.nodes("MatMul")):
        weight_name = node.input[1]
        key = names.builder_weight_key(weight_name)
        if key is None or weight_name not in graph.initializers:
            continue
        parts = names.unpack_key(key)
        if any(part not in components for part in parts):
            continue

        float_weight = graph.array(weight_name).T  # the builder stores [K, N]; GGUF rows are N
        decoded, offset = [], 0
        for part in parts:
            tensor = gguf_file.tensors[components[part]]
            rows = tensor.shape[0]
            decoded.append(_decode_component(gguf_file, spec, components[part], float_weight[offset : offset + rows]))
            offset += rows
        if any(component.weight is None for component in decoded):
            for component in decoded:
                report.tensors.append(TensorRecord(component.gguf_name, component.type_name, weight_name, "float (unchanged)"))
            continue

        weights = [component.weight for component in decoded]
        _emit_matmul(graph, node, weight_name, weights, report.accuracy_level)
        if len(weights) == 1 or _mergeable(weights):
            replaced[key] = _merge(weights) if len(weights) > 1 else weights[0]
        for component, weight in zip(decoded, weights):
            became = describe(weight)
            if spec is None or component.type_name not in blocks.SUPPORTED_TYPES:
                became = f"requantized to {REQUANTIZE_TYPE}: {became}"
                report.requantized.append(component.gguf_name)
            report.tensors.append(TensorRecord(component.gguf_name, component.type_name, weight_name, became))
    return replaced


def _mergeable(weights: list[blocks.BlockWeight]) -> bool:
    return len({weight.bits for weight in weights}) == 1


def _merge(weights: list[blocks.BlockWeight]) -> blocks.BlockWeight:
    """Stack same-width weights along N, aligning block sizes and zero-point kinds exactly."""
    block_size = min(weight.block_size for weight in weights)
    kinds = {weight.zero_point_kind for weight in weights}
    float_zero = "float" in kinds
    explicit_zero = len(kinds) > 1 or any(weight.offsets is not None for weight in weights)
    with_offsets = any(weight.offsets is not None for weight in weights)

    codes, scales, zeros, offsets, minimums = [], [], [], [], []
    for weight in weights:
        repeat = weight.block_size // block_size  # split a block into equal smaller blocks
        codes.append(weight.codes)
        scales.append(np.repeat(weight.scales, repeat, axis=1))
        zero = weight.explicit_zero_points()
        zeros.append(np.repeat(zero.astype(np.float32) if float_zero else zero, repeat, axis=1))
        offset = weight.offsets if weight.offsets is not None else np.zeros(weight.scales.shape, np.float32)
        offsets.append(np.repeat(offset, repeat, axis=1))
        minimum = weight.minimums if weight.minimums is not None else -zero.astype(np.float32) * weight.scales
        minimums.append(np.repeat(minimum, repeat, axis=1))

    first = weights[0]
    zero_points = np.concatenate(zeros) if (explicit_zero or first.zero_points is not None) else None
    return blocks.BlockWeight(
        "+".join(weight.source_type for weight in weights),
        first.bits,
        block_size,
        np.concatenate(codes),
        np.concatenate(scales),
        zero_points,
        np.concatenate(offsets) if with_offsets else None,
        np.concatenate(minimums) if float_zero else None,
    )


def _emit_matmul(graph: _Graph, node: Any, weight_name: str, weights: list[blocks.BlockWeight], accuracy_level: int) -> None:
    """Replace ``node`` by one MatMulNBits, or by one per width and a Concat when widths differ."""
    output = node.output[0]
    graph.remove(node)
    if len(weights) == 1 or _mergeable(weights):
        merged = weights[0] if len(weights) == 1 else _merge(weights)
        graph.matmul_nbits(node.input[0], output, weight_name, merged, accuracy_level)
        return

    part_outputs = []
    for index, weight in enumerate(weights):
        part_output = f"{output}/part{index}"
        graph.matmul_nbits(node.input[0], part_output, f"{weight_name}.part{index}", weight, accuracy_level)
        part_outputs.append(part_output)
    graph.add_node("Concat", part_outputs, [output], f"{node.name}/Concat", axis=-1)


def _replace_embedding(
    graph: _Graph,
    gguf_file: GGUFFile,
    components: dict[str, str],
    matmuls: dict[str, blocks.BlockWeight],
    report: TranscodeReport,
) -> None:
    """Point the embedding Gather at quantized blocks.

    ``GatherBlockQuantized`` (com.microsoft) takes integer zero points only, so the formats
    with a float minimum (Q4_1, Q4_K, Q5_1, Q5_K) keep a float embedding: the dequantized
    values, which are exact but 4 bytes each.
    """
    gather = graph.embedding_gather()
    gguf_name = components.get(names.EMBEDDING)
    if gather is None or gguf_name is None:
        return
    tensor = gguf_file.tensors[gguf_name]
    if tensor.type_name in FLOAT_TYPES:
        return

    table_input = gather.input[0]
    tied_source = graph.producer(table_input)
    shared = matmuls.get(names.OUTPUT_HEAD) if components.get(names.OUTPUT_HEAD) == gguf_name else None
    if tied_source is not None and tied_source.op_type == "Transpose":
        if shared is None:
            return  # the head stayed float, so the tied Transpose + Gather still work
        graph.remove(tied_source)
        weight = shared
        head_name = tied_source.input[0]
    else:
        float_table = graph.array(table_input)
        weight = shared or _decode_embedding(gguf_file, gguf_name, float_table)
        head_name = None
    record_name = table_input if head_name is None else head_name

    if weight.zero_point_kind == "float" or weight.offsets is not None:
        graph.set_initializer(f"{names.EMBEDDING}.weight", weight.dequantize())
        gather.input[0] = f"{names.EMBEDDING}.weight"
        became = "Gather float32 (dequantized: GatherBlockQuantized takes no float zero points)"
    else:
        graph.gather_block_quantized(gather, weight, head_name)
        became = describe(weight, "GatherBlockQuantized")
    report.tensors.append(TensorRecord(gguf_name, tensor.type_name, record_name + " (embedding)", became))


def _decode_embedding(gguf_file: GGUFFile, gguf_name: str, float_table: np.ndarray) -> blocks.BlockWeight:
    tensor = gguf_file.tensors[gguf_name]
    if tensor.type_name not in blocks.SUPPORTED_TYPES:
        return _requantize(float_table)
    weight = blocks.decode(tensor.type_name, tensor.data)
    _check_match(gguf_name, weight, float_table)
    return weight


class _Graph:
    """Small editing helpers over an ``onnx.ModelProto`` graph."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.new_nodes: list[tuple[int, Any]] = []
        # Node names are unique in the builder's graph; protobuf wrappers have no stable id().
        self._position = {node.name: index for index, node in enumerate(self.graph.node)}
        self._removed: set[str] = set()

    def nodes(self, op_type: str) -> list[Any]:
        return [node for node in self.graph.node if node.op_type == op_type]

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.initializers[name])

    def producer(self, output: str) -> Any:
        for node in self.graph.node:
            if output in node.output and node.name not in self._removed:
                return node
        return None

    def embedding_gather(self) -> Any:
        for node in self.graph.node:
            if node.op_type == "Gather" and "input_ids" in node.input[1:] and node.name.startswith("/model/embed_tokens"):
                return node
        return None

    def remove(self, node: Any) -> None:
        self._removed.add(node.name)
        self._anchor = self._position[node.name]

    def add_node(
        self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", constant: bool = False, **attributes: Any
    ) -> Any:
        """Add a node after the removed node it replaces; ``constant`` nodes (inputs all
        initializers) go to the front, so any later node may use them."""
        from onnx import helper

        node = helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attributes)
        self.new_nodes.append((-1 if constant else self._anchor, node))
        return node

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if name in self.initializers:
            self.graph.initializer.remove(self.initializers[name])
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor

    def matmul_nbits(self, activation: str, output: str, weight_name: str, weight: blocks.BlockWeight, accuracy_level: int) -> None:
        """Add a MatMulNBits computing ``activation @ weight.T`` into ``output``.

        Block offsets (``value = (code - zero) * scale + offset``) become a second branch that
        adds ``offset`` times each block's sum of the activation.
        """
        n, k = weight.shape
        prefix = weight_name.removesuffix(".weight")
        codes = f"{prefix}.weight_Q{weight.bits}G{weight.block_size}"
        self.set_initializer(codes, blocks.pack_codes(weight))
        inputs = [activation, codes, self.float_constant(f"{prefix}.weight_scale", weight.scales)]
        zero_points = self._zero_point_input(prefix, weight, inputs[2])
        if zero_points is not None:
            inputs.append(zero_points)

        product = output if weight.offsets is None else f"{output}/nbits"
        self.add_node(
            "MatMulNBits", inputs, [product], f"{prefix}/MatMulNBits", domain="com.microsoft",
            K=k, N=n, bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level,
        )
        if weight.offsets is not None:
            self._add_offset_branch(activation, product, output, prefix, weight)

    def float_constant(self, name: str, values: np.ndarray) -> str:
        """Store float32 ``values`` as float16 plus a Cast when that is exact; return the float32 name.

        ONNX Runtime folds the Cast of an initializer when it loads the model, so the file
        holds half the bytes while the kernels see the same float32 values.
        """
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            self.set_initializer(name, values.astype(np.float32))
            return name
        self.set_initializer(f"{name}_f16", half)
        self.add_node("Cast", [f"{name}_f16"], [name], f"{name}/Cast", constant=True, to=1)  # 1: FLOAT
        return name

    def _zero_point_input(self, prefix: str, weight: blocks.BlockWeight, scale_name: str) -> str | None:
        """Add the zero points; float ones come from float16 minimums (``-m / scale``) when exact."""
        zero_points = blocks.pack_zero_points(weight)
        if zero_points is None:
            return None
        name = f"{prefix}.weight_zp"
        if weight.zero_point_kind != "float" or weight.minimums is None:
            self.set_initializer(name, zero_points)
            return name
        scale_is_half = scale_name not in self.initializers  # produced by a Cast from float16
        minimums_are_half = np.array_equal(weight.minimums.astype(np.float16).astype(np.float32), weight.minimums)
        if not (scale_is_half and minimums_are_half):
            self.set_initializer(name, zero_points)
            return name
        minimums = self.float_constant(f"{prefix}.weight_min", weight.minimums)
        # Same float32 division as the decoder's -m / d, so the zero points are bit-identical.
        self.add_node("Div", [minimums, scale_name], [f"{name}_neg"], f"{name}/Div", constant=True)
        self.add_node("Neg", [f"{name}_neg"], [name], f"{name}/Neg", constant=True)
        return name

    def _add_offset_branch(self, activation: str, product: str, output: str, prefix: str, weight: blocks.BlockWeight) -> None:
        n_blocks = weight.offsets.shape[1]
        block_shape = f"{prefix}.block_shape"
        self.set_initializer(block_shape, np.array([0, 0, n_blocks, weight.block_size], dtype=np.int64))
        self.set_initializer(f"{prefix}.reduce_axes", np.array([-1], dtype=np.int64))
        offsets = self.float_constant(f"{prefix}.weight_offset", np.ascontiguousarray(weight.offsets.T, dtype=np.float32))
        self.add_node("Reshape", [activation, block_shape], [f"{output}/blocks"], f"{prefix}/OffsetReshape")
        self.add_node(
            "ReduceSum", [f"{output}/blocks", f"{prefix}.reduce_axes"], [f"{output}/block_sums"], f"{prefix}/OffsetSum", keepdims=0
        )
        self.add_node("MatMul", [f"{output}/block_sums", offsets], [f"{output}/offset"], f"{prefix}/OffsetMatMul")
        self.add_node("Add", [product, f"{output}/offset"], [output], f"{prefix}/OffsetAdd")

    def gather_block_quantized(self, gather: Any, weight: blocks.BlockWeight, head_weight: str | None) -> None:
        """Replace ``gather`` by a GatherBlockQuantized over ``weight`` (vocab rows).

        With ``head_weight`` (a tied head already turned into MatMulNBits), the codes, scales
        and zero points of the head are reused through a Reshape instead of stored twice.
        """
        vocab, hidden = weight.shape
        row_bytes = hidden * weight.bits // 8
        if head_weight is not None:
            prefix = head_weight.removesuffix(".weight")
            codes = f"{prefix}.weight_Q{weight.bits}G{weight.block_size}"
            scales = f"{prefix}.weight_scale"
            zero = f"{prefix}.weight_zp" if weight.zero_points is not None else None
        else:
            prefix = f"{names.EMBEDDING}"
            codes, scales = f"{prefix}.weight_Q{weight.bits}G{weight.block_size}", f"{prefix}.weight_scale"
            self.set_initializer(codes, blocks.pack_codes(weight))
            scales = self.float_constant(scales, weight.scales)
            zero = None
            if weight.zero_points is not None:
                zero = f"{prefix}.weight_zp"
                self.set_initializer(zero, blocks.pack_zero_points(weight))

        self._anchor = self._position[gather.name]
        self.remove(gather)
        shape_name = f"{names.EMBEDDING}.table_shape"
        self.set_initializer(shape_name, np.array([vocab, row_bytes], dtype=np.int64))
        table = "/model/embed_tokens/Reshape/output_0"
        self.add_node("Reshape", [codes, shape_name], [table], "/model/embed_tokens/Reshape", constant=True)
        inputs = [table, gather.input[1], scales] + ([zero] if zero else [])
        self.add_node(
            "GatherBlockQuantized", inputs, list(gather.output), "/model/embed_tokens/GatherBlockQuantized",
            domain="com.microsoft", bits=weight.bits, block_size=weight.block_size, gather_axis=0, quantize_axis=1,
        )

    def finish(self) -> None:
        """Apply removals and insertions in topological position, then drop dead initializers."""
        inserted: dict[int, list[Any]] = {}
        for anchor, node in self.new_nodes:
            inserted.setdefault(anchor, []).append(node)
        ordered = list(inserted.get(-1, []))
        for index, node in enumerate(self.graph.node):
            if node.name not in self._removed:
                ordered.append(node)
            ordered.extend(inserted.get(index, []))
        del self.graph.node[:]
        self.graph.node.extend(ordered)

        used = {name for node in self.graph.node for name in node.input}
        used.update(output.name for output in self.graph.output)
        for tensor in list(self.graph.initializer):
            if tensor.name not in used:
                self.graph.initializer.remove(tensor)


def _save(model: Any, folder: Path) -> None:
    """Write the graph and its weights as ``model.onnx`` plus one external data file."""
    import onnx

    for stale in (folder / MODEL_FILE, folder / DATA_FILE):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
