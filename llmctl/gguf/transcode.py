"""Carry a GGUF file's quantized blocks into the float ONNX graph converted from it.

The convert step exports the dequantized model with the ONNX Runtime GenAI model builder
(fp32). This module then replaces each ``MatMul`` whose weight came from a quantized GGUF
tensor with a ``MatMulNBits`` holding that tensor's own codes, scales and minimums, and the
embedding ``Gather`` with a ``GatherBlockQuantized`` where the operator can represent the
format. No value is rounded a second time: every replacement is checked against the float
weight it replaces before the graph is written. Values the GGUF file stores more compactly
than ``MatMulNBits`` reads them (5-bit codes, K-quant scale factors) and the builder's rotary
caches are stored compactly and computed by constant nodes, which ONNX Runtime folds when it
loads the model.
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
    head_accuracy_level: int = 0
    computed_at_load: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in self.tensors:
            counts[record.became] = counts.get(record.became, 0) + 1
        return {
            "architecture": self.architecture,
            "accuracy_level": self.accuracy_level,
            "head_accuracy_level": self.head_accuracy_level,
            "fallback": self.fallback,
            "requantized": self.requantized,
            "computed_at_load": self.computed_at_load,
            "counts": counts,
            "tensors": [asdict(record) for record in self.tensors],
        }


def describe(weight: blocks.BlockWeight, op: str = "MatMulNBits", accuracy_level: int = 0) -> str:
    """Return a short description of a converted weight (``MatMulNBits 4-bit block 32, block offsets``)."""
    text = f"{op} {weight.bits}-bit block {weight.block_size}"
    if op == "MatMulNBits" and weight.bits == 8 and accuracy_level < 4:
        text += " (run as 4-bit halves)"
    if weight.zero_point_kind != "default":
        text += f", {weight.zero_point_kind} zero points"
    if weight.offsets is not None:
        text += ", block offsets"
    if op == "MatMulNBits" and weight.five_bit is not None and accuracy_level < 4:
        text += ", stored as 5-bit codes"
    if op == "MatMulNBits" and accuracy_level:
        text += f", accuracy level {accuracy_level}"
    if weight.scale_factors is not None:
        text += ", factored scales"
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
    head_accuracy_level: int = 0,
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
        accuracy_level: ``MatMulNBits`` accuracy level of the decoder layers. 0 and 1
            compute in float and keep the products equal to the dequantized ones; 4 quantizes
            activations to int8 on CPU (faster, no longer exact).
        head_accuracy_level: the same for the output head, the largest matrix product. Level
            4 keeps the head's weights exact but quantizes its input to int8 blocks.

    Measured on SmolLM2-135M Q4_1 with ``bench/gguf_lossless.py`` (WikiText-2, 1024 tokens,
    onnxruntime 1.32, 2 shared CPU cores): level 0 everywhere gave the dequantized model's
    perplexity to 4 decimals at 42 tokens/s; level 4 on the head alone cost 0.16% perplexity
    at 59 tokens/s; level 4 everywhere cost 1.06% at about 65 tokens/s (a separate run). The
    default stays exact, because the convert step's parity check compares logits with the
    dequantized PyTorch model.

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
    for level in (accuracy_level, head_accuracy_level):
        if level not in (0, 1, 2, 3, 4):
            raise UsageError(f"invalid MatMulNBits accuracy level {level}", hint="choose 0, 1, 2, 3 or 4")

    gguf_file = read_gguf(gguf_path)
    spec = _architecture_or_none(gguf_file.architecture, fallback)
    model_path = Path(model_dir) / MODEL_FILE
    if not model_path.is_file():
        raise ConversionError(f"{model_path} not found", hint="transcoding needs the GenAI builder's fp32 graph")
    if spec is not None:
        _check_block_types(gguf_file, fallback)

    model = onnx.load(str(model_path), load_external_data=True)
    graph = _Graph(model)
    report = TranscodeReport(
        architecture=gguf_file.architecture, fallback=fallback, accuracy_level=accuracy_level, head_accuracy_level=head_accuracy_level
    )
    components = _gguf_components(gguf_file)
    matmuls = _replace_matmuls(graph, gguf_file, spec, components, report)
    _replace_embedding(graph, gguf_file, components, matmuls, report)
    if not report.tensors:
        raise ConversionError(
            f"{model_path}: no MatMul weight of the graph matches a tensor of {gguf_path}",
            hint="transcoding works on the GenAI builder's fp32 graph of the same model",
        )
    report.computed_at_load = _compute_rotary_caches_at_load(graph)
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
        level = report.head_accuracy_level if key == names.OUTPUT_HEAD else report.accuracy_level
        _emit_matmul(graph, node, weight_name, weights, level)
        if len(weights) == 1 or _mergeable(weights):
            replaced[key] = _merge(weights) if len(weights) > 1 else weights[0]
        for component, weight in zip(decoded, weights):
            became = describe(weight, accuracy_level=level)
            if spec is None or component.type_name not in blocks.SUPPORTED_TYPES:
                became = f"requantized to {REQUANTIZE_TYPE}: {became}"
                report.requantized.append(component.gguf_name)
            report.tensors.append(TensorRecord(component.gguf_name, component.type_name, weight_name, became))
    return replaced


def _mergeable(weights: list[blocks.BlockWeight]) -> bool:
    """Return whether the weights can share one MatMulNBits without storing more bytes."""
    if len({weight.bits for weight in weights}) != 1:
        return False
    # Packed 5-bit codes merge only with each other: merging them with 8-bit codes would
    # store them at 8 bits.
    five_bit = {None if weight.five_bit is None else weight.five_bit.shift for weight in weights}
    return len(five_bit) == 1 and len({weight.block_size for weight in weights if weight.five_bit is not None}) <= 1


def _mergeable_groups(weights: list[blocks.BlockWeight]) -> list[list[blocks.BlockWeight]]:
    """Split the parts of a packed weight into runs of consecutive mergeable ones."""
    groups = [[weights[0]]]
    for weight in weights[1:]:
        if _mergeable(groups[-1] + [weight]):
            groups[-1].append(weight)
        else:
            groups.append([weight])
    return groups


def _merge_factors(weights: list[blocks.BlockWeight], attribute: str, block_size: int) -> blocks.FactoredValues | None:
    """Stack the K-quant factors of the weights, or return None unless they all have them alike."""
    factors = [getattr(weight, attribute) for weight in weights]
    if any(factor is None for factor in factors) or any(weight.block_size != block_size for weight in weights):
        return None
    if len({factor.factors.shape[1] // factor.super_scales.shape[1] for factor in factors}) != 1:
        return None
    if len({factor.factors.dtype for factor in factors}) != 1:
        return None
    return blocks.FactoredValues(
        np.concatenate([factor.super_scales for factor in factors]), np.concatenate([factor.factors for factor in factors])
    )


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
    five_bit = None
    if all(weight.five_bit is not None for weight in weights):
        five_bit = blocks.FiveBitCodes(
            np.concatenate([weight.five_bit.low_nibbles for weight in weights]),
            np.concatenate([weight.five_bit.high_bits for weight in weights]),
            first.five_bit.shift,
        )
    return blocks.BlockWeight(
        "+".join(weight.source_type for weight in weights),
        first.bits,
        block_size,
        np.concatenate(codes),
        np.concatenate(scales),
        zero_points,
        np.concatenate(offsets) if with_offsets else None,
        np.concatenate(minimums) if float_zero else None,
        five_bit=five_bit,
        scale_factors=_merge_factors(weights, "scale_factors", block_size),
        offset_factors=_merge_factors(weights, "offset_factors", block_size) if with_offsets else None,
    )


def _emit_matmul(graph: _Graph, node: Any, weight_name: str, weights: list[blocks.BlockWeight], accuracy_level: int) -> None:
    """Replace ``node`` by one MatMulNBits, or by one per run of mergeable parts and a Concat."""
    output = node.output[0]
    graph.remove(node)
    if len(weights) == 1 or _mergeable(weights):
        merged = weights[0] if len(weights) == 1 else _merge(weights)
        graph.matmul_nbits(node.input[0], output, weight_name, merged, accuracy_level)
        return

    part_outputs = []
    for index, group in enumerate(_mergeable_groups(weights)):
        part_output = f"{output}/part{index}"
        weight = group[0] if len(group) == 1 else _merge(group)
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
        self._interleave_cache: dict[str, str] = {}
        self._block_sum_cache: dict[tuple[str, int], str] = {}

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

    def drop_initializer(self, name: str) -> None:
        self.graph.initializer.remove(self.initializers.pop(name))

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
        if weight.bits == 8 and accuracy_level < 4:
            self._matmul_8bit(activation, output, weight_name, weight, accuracy_level)
            return
        # NOTE: an 8-bit weight at accuracy level 4 keeps the 8-bit kernel, which is fast there,
        # so packed 5-bit codes are stored at 8 bits on this path.
        n, k = weight.shape
        prefix = weight_name.removesuffix(".weight")
        codes = f"{prefix}.weight_Q{weight.bits}G{weight.block_size}"
        self.set_initializer(codes, blocks.pack_codes(weight))
        scales = self.block_values(f"{prefix}.weight_scale", weight.scales, weight.scale_factors)
        inputs = [activation, codes, scales]
        zero_points = self._zero_point_input(prefix, weight, scales)
        if zero_points is not None:
            inputs.append(zero_points)

        product = output if weight.offsets is None else f"{output}/nbits"
        self.add_node(
            "MatMulNBits", inputs, [product], f"{prefix}/MatMulNBits", domain="com.microsoft",
            K=k, N=n, bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level,
        )
        if weight.offsets is not None:
            offsets = self.block_values(f"{prefix}.weight_offset", weight.offsets, weight.offset_factors)
            self._add_offset_branch(activation, product, output, prefix, offsets, weight.block_size)

    def _matmul_8bit(self, activation: str, output: str, weight_name: str, weight: blocks.BlockWeight, accuracy_level: int) -> None:
        """Add an 8-bit weight as one 4-bit MatMulNBits over the same bytes, exactly.

        A code byte ``q = low + 16 * high`` is two 4-bit codes, so the bytes read as a 4-bit
        weight of 2K columns whose blocks hold twice the codes. With the activation
        interleaved as ``(a, 16 a)`` and a 4-bit zero point ``z``, that node computes
        ``scale * a * (q - 17 z)`` per value, and the offset branch adds the rest:
        ``((17 z - zero_point) * scale + offset)`` times the block sums. The CPU kernel of
        onnxruntime 1.32 runs 8-bit codes at accuracy levels 0 and 1 on a slow path (about
        30 times slower on SmolLM2's 49152 x 576 output head), and this form stores no
        extra bytes.
        """
        n, k = weight.shape
        n_blocks = k // weight.block_size
        prefix = weight_name.removesuffix(".weight")
        scales = self.block_values(f"{prefix}.weight_scale", weight.scales, weight.scale_factors)
        if weight.five_bit is not None:
            codes, shift = self._unpack_five_bit(prefix, weight.five_bit), weight.five_bit.shift
        else:
            codes, shift = f"{prefix}.weight_Q8G{weight.block_size}", 0
            self.set_initializer(codes, blocks.pack_codes(weight))

        # The 4-bit zero point closest to zero_point / 17 keeps the offset branch small.
        zero = weight.explicit_zero_points().astype(np.int32) - shift
        uniform = int(zero.min()) == int(zero.max())
        zero4 = int(np.clip(np.rint(zero.flat[0] / 17), 0, 15)) if uniform else 8
        inputs = [self._interleaved(activation), codes, scales]
        if zero4 != 8:
            inputs.append(self._uniform_zero_points(prefix, zero4, n, n_blocks))
        product = f"{output}/nbits"
        self.add_node(
            "MatMulNBits", inputs, [product], f"{prefix}/MatMulNBits", domain="com.microsoft",
            K=2 * k, N=n, bits=4, block_size=2 * weight.block_size, accuracy_level=accuracy_level,
        )

        if uniform:
            offsets = self._scaled(scales, 17 * zero4 - int(zero.flat[0]), prefix)
            if weight.offsets is not None:
                minimums = self.block_values(f"{prefix}.weight_offset", weight.offsets, weight.offset_factors)
                offsets = minimums if offsets is None else self._add_constant("Add", [offsets, minimums], f"{prefix}.weight_offset_sum")
        else:
            values = (17 * zero4 - zero).astype(np.float32) * weight.scales
            if weight.offsets is not None:
                values = values + weight.offsets
            offsets = self.float_constant(f"{prefix}.weight_offset", values)
        if offsets is None:
            self.add_node("Identity", [product], [output], f"{prefix}/Identity")
            return
        self._add_offset_branch(activation, product, output, prefix, offsets, weight.block_size)

    def _add_constant(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.add_node(op_type, inputs, [output], f"{output}/{op_type}", constant=True, **attributes)
        return output

    def _shared_initializer(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            self.set_initializer(name, array)
        return name

    def _scaled(self, scales: str, factor: int, prefix: str) -> str | None:
        """Return ``scales * factor`` (computed when the model loads), or None for 0."""
        if factor == 0:
            return None
        if factor == 1:
            return scales
        constant = self._shared_initializer(f"gguf.float_{factor}", np.array(factor, dtype=np.float32))
        return self._add_constant("Mul", [scales, constant], f"{prefix}.weight_offset_scaled")

    def _interleaved(self, activation: str) -> str:
        """Return ``activation`` [B, S, K] with each value followed by 16 times itself: [B, S, 2K]."""
        if activation in self._interleave_cache:
            return self._interleave_cache[activation]
        sixteen = self._shared_initializer("gguf.float_16", np.array(16, dtype=np.float32))
        last_axis = self._shared_initializer("gguf.last_axis", np.array([-1], dtype=np.int64))
        # The builder's MatMul activations are [batch, sequence, hidden]; 0 keeps those two dims.
        shape = self._shared_initializer("gguf.interleaved_shape", np.array([0, 0, -1], dtype=np.int64))
        name = f"{activation}/interleaved"
        self.add_node("Mul", [activation, sixteen], [f"{name}/x16"], f"{name}/Mul")
        self.add_node("Unsqueeze", [activation, last_axis], [f"{name}/x1_pair"], f"{name}/Unsqueeze")
        self.add_node("Unsqueeze", [f"{name}/x16", last_axis], [f"{name}/x16_pair"], f"{name}/Unsqueeze16")
        self.add_node("Concat", [f"{name}/x1_pair", f"{name}/x16_pair"], [f"{name}/pairs"], f"{name}/Concat", axis=-1)
        self.add_node("Reshape", [f"{name}/pairs", shape], [name], f"{name}/Reshape")
        self._interleave_cache[activation] = name
        return name

    def _uniform_zero_points(self, prefix: str, zero4: int, n: int, n_blocks: int) -> str:
        """Add packed 4-bit zero points, all ``zero4``, expanded when the model loads."""
        byte = self._shared_initializer(f"gguf.zero_point_byte_{zero4}", np.array([zero4 | zero4 << 4], dtype=np.uint8))
        self.set_initializer(f"{prefix}.weight_zp4_shape", np.array([n, (n_blocks + 1) // 2], dtype=np.int64))
        return self._add_constant("Expand", [byte, f"{prefix}.weight_zp4_shape"], f"{prefix}.weight_zp4")

    def _unpack_five_bit(self, prefix: str, five_bit: blocks.FiveBitCodes) -> str:
        """Store 5-bit codes at their GGUF size and unpack them into one byte each when the model loads.

        Returns the name of uint8 ``[N, n_blocks, 32]`` 5-bit values (``shift`` not added).
        """
        low, high = f"{prefix}.weight_Q5_low", f"{prefix}.weight_Q5_high"
        self.set_initializer(low, five_bit.low_nibbles)
        self.set_initializer(high, five_bit.high_bits)
        mask4 = self._shared_initializer("gguf.uint8_15", np.array(15, dtype=np.uint8))
        four = self._shared_initializer("gguf.uint8_4", np.array(4, dtype=np.uint8))
        one = self._shared_initializer("gguf.uint8_1", np.array(1, dtype=np.uint8))
        bit_shifts = self._shared_initializer("gguf.bit_shifts", np.arange(8, dtype=np.uint8))
        last_axis = self._shared_initializer("gguf.last_axis", np.array([-1], dtype=np.int64))
        block_shape = self._shared_initializer("gguf.block_of_32", np.array([0, 0, 32], dtype=np.int64))

        lows = self._add_constant("BitwiseAnd", [low, mask4], f"{low}/first")
        highs = self._add_constant("BitShift", [low, four], f"{low}/second", direction="RIGHT")
        nibbles = self._add_constant("Concat", [lows, highs], f"{low}/nibbles", axis=-1)
        field = self._add_constant("Unsqueeze", [high, last_axis], f"{high}/bytes")
        shifted = self._add_constant("BitShift", [field, bit_shifts], f"{high}/shifted", direction="RIGHT")
        bits = self._add_constant("BitwiseAnd", [shifted, one], f"{high}/bits")
        bits = self._add_constant("Reshape", [bits, block_shape], f"{high}/bits32")
        fifth = self._add_constant("BitShift", [bits, four], f"{high}/fifth", direction="LEFT")
        return self._add_constant("BitwiseOr", [nibbles, fifth], f"{prefix}.weight_Q5G32")

    def block_values(self, name: str, values: np.ndarray, factors: blocks.FactoredValues | None) -> str:
        """Add float32 per-block ``values`` [N, n_blocks]; return the name the kernels read.

        K-quant factors are stored as such (a float16 super-block scale and an integer per
        block) and multiplied when the model loads, when that reproduces ``values`` exactly.
        """
        if factors is None or not _factors_exact(factors, values):
            return self.float_constant(name, values)
        n, n_blocks = factors.factors.shape
        n_super = factors.super_scales.shape[1]
        supers = self.float_constant(f"{name}_super", factors.super_scales)
        self.set_initializer(f"{name}_factor", factors.factors)
        self.set_initializer(f"{name}_grouped_shape", np.array([n, n_super, n_blocks // n_super], dtype=np.int64))
        self.set_initializer(f"{name}_shape", np.array([n, n_blocks], dtype=np.int64))
        last_axis = self._shared_initializer("gguf.last_axis", np.array([-1], dtype=np.int64))
        widened = self._add_constant("Cast", [f"{name}_factor"], f"{name}_factor_float", to=1)  # 1: FLOAT
        grouped = self._add_constant("Reshape", [widened, f"{name}_grouped_shape"], f"{name}_grouped")
        column = self._add_constant("Unsqueeze", [supers, last_axis], f"{name}_super_column")
        product = self._add_constant("Mul", [grouped, column], f"{name}_grouped_product")
        return self._add_constant("Reshape", [product, f"{name}_shape"], name)

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
        if weight.zero_point_kind == "uint8" and weight.bits == 4 and np.all(weight.zero_points == weight.zero_points.flat[0]):
            # Formats with minimums have zero points of 0 everywhere: nothing worth storing.
            n, n_blocks = weight.zero_points.shape
            return self._uniform_zero_points(prefix, int(weight.zero_points.flat[0]), n, n_blocks)
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

    def _add_offset_branch(self, activation: str, product: str, output: str, prefix: str, offsets: str, block_size: int) -> None:
        """Add ``offsets`` [N, n_blocks] times the activation's block sums to ``product``."""
        transposed = self._add_constant("Transpose", [offsets], f"{prefix}.weight_offset_t", perm=[1, 0])
        self.add_node("MatMul", [self._block_sums(activation, block_size), transposed], [f"{output}/offset"], f"{prefix}/OffsetMatMul")
        self.add_node("Add", [product, f"{output}/offset"], [output], f"{prefix}/OffsetAdd")

    def _block_sums(self, activation: str, block_size: int) -> str:
        """Return the sums of each block of ``block_size`` values of ``activation`` [B, S, K]."""
        key = (activation, block_size)
        if key in self._block_sum_cache:
            return self._block_sum_cache[key]
        name = f"{activation}/block_sums_{block_size}"
        shape = self._shared_initializer(f"gguf.blocks_of_{block_size}", np.array([0, 0, -1, block_size], dtype=np.int64))
        last_axis = self._shared_initializer("gguf.last_axis", np.array([-1], dtype=np.int64))
        self.add_node("Reshape", [activation, shape], [f"{name}/blocks"], f"{name}/Reshape")
        self.add_node("ReduceSum", [f"{name}/blocks", last_axis], [name], f"{name}/ReduceSum", keepdims=0)
        self._block_sum_cache[key] = name
        return name

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
            if codes not in self.initializers or (zero is not None and zero not in self.initializers):
                head_weight = None  # the head keeps its codes in another form: store the table's own
        if head_weight is None:
            prefix = f"{names.EMBEDDING}"
            codes, scales = f"{prefix}.weight_Q{weight.bits}G{weight.block_size}", f"{prefix}.weight_scale"
            self.set_initializer(codes, blocks.pack_codes(weight))
            scales = self.block_values(scales, weight.scales, weight.scale_factors)
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


def _compute_rotary_caches_at_load(graph: _Graph) -> list[str]:
    """Replace the builder's stored rotary cos/sin caches by nodes that compute them at load.

    The GenAI builder stores ``cos(t * inv_freq)`` and ``sin(...)`` for every position up to
    the context length as float32 (67 MB for Gemma-3's two 32768 x 128 pairs), which a GGUF
    file does not carry. A pair is replaced only when the builder's own formula
    ``inv_freq = 1 / theta ** (arange(0, dim, 2) / dim)`` with a recovered ``theta``
    reproduces it bit for bit in PyTorch. ONNX Runtime's Cos and Sin may then differ from
    PyTorch's by float32 rounding.

    Returns:
        The names of the caches now computed when the model loads.
    """
    replaced = []
    for cos_name in sorted(name for name in graph.initializers if name.startswith("cos_cache")):
        sin_name = "sin" + cos_name[3:]
        if sin_name not in graph.initializers:
            continue
        inverse_frequencies = _rotary_inverse_frequencies(graph.array(cos_name), graph.array(sin_name))
        if inverse_frequencies is None:
            logger.info("keeping the stored rotary cache %s: no known formula reproduces it", cos_name)
            continue
        length = graph.array(cos_name).shape[0]
        graph.drop_initializer(cos_name)
        graph.drop_initializer(sin_name)
        graph.set_initializer(f"{cos_name}.inv_freq", inverse_frequencies[None, :])
        graph.set_initializer(f"{cos_name}.positions", np.arange(length, dtype=np.float32)[:, None])
        # The [length, 1] x [1, dim / 2] product is the builder's torch.outer, value for value.
        graph.add_node("Mul", [f"{cos_name}.positions", f"{cos_name}.inv_freq"], [f"{cos_name}.angles"], f"{cos_name}/Mul", constant=True)
        graph.add_node("Cos", [f"{cos_name}.angles"], [cos_name], f"{cos_name}/Cos", constant=True)
        graph.add_node("Sin", [f"{cos_name}.angles"], [sin_name], f"{sin_name}/Sin", constant=True)
        replaced += [cos_name, sin_name]
    return replaced


def _rotary_inverse_frequencies(cos: np.ndarray, sin: np.ndarray) -> np.ndarray | None:
    """Return the float32 ``inv_freq`` whose caches equal ``cos`` and ``sin``, or None."""
    import torch

    if cos.dtype != np.float32 or cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] < 2 or cos.shape[1] < 2:
        return None
    half = cos.shape[1]
    dim = 2 * half
    # The last column turns slowest, so its angle at position 1 gives theta with the least error.
    angle = float(np.arctan2(np.float64(sin[1, half - 1]), np.float64(cos[1, half - 1])))
    if angle <= 0:
        return None
    estimate = angle ** (-dim / (2 * (half - 1)))
    positions = torch.arange(cos.shape[0], dtype=torch.float32)
    for theta in dict.fromkeys([float(f"{estimate:.4g}"), float(round(estimate))]):
        inverse = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        angles = torch.outer(positions, inverse)
        if np.array_equal(torch.cos(angles).numpy(), cos) and np.array_equal(torch.sin(angles).numpy(), sin):
            return inverse.numpy().astype(np.float32)
    return None


def _factors_exact(factors: blocks.FactoredValues, values: np.ndarray) -> bool:
    n, n_blocks = factors.factors.shape
    n_super = factors.super_scales.shape[1]
    if values.shape != (n, n_blocks) or n_blocks % n_super:
        return False
    if not np.array_equal(factors.super_scales.astype(np.float16).astype(np.float32), factors.super_scales):
        return False
    grouped = factors.factors.astype(np.float32).reshape(n, n_super, n_blocks // n_super)
    product = (grouped * factors.super_scales[..., None]).reshape(n, n_blocks)
    return bool(np.array_equal(product, values))


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
