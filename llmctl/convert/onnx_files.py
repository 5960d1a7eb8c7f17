"""Loading, saving and rewriting ONNX files of an artifact.

Every save writes the weights as external data in one file next to the graph, so models past
the 2 GB protobuf limit are written the same way as small ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from llmctl.errors import InputError

logger = logging.getLogger(__name__)

EXTERNAL_DATA_SUFFIX = ".data"


def load_model(path: Path, *, load_external_data: bool = True):
    """Load an ONNX model, with its external data unless told otherwise.

    Raises:
        InputError: the graph or its external data is truncated, corrupt or missing.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"{path}: cannot load the ONNX model: {detail}", hint="the artifact is damaged; convert the model again"
        ) from error


def external_data_files(path: Path) -> list[Path]:
    """Return the external data files that the graph at ``path`` refers to."""
    import onnx

    model = load_model(path, load_external_data=False)
    names = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return [path.parent / name for name in sorted(names)]


def save_model(model, path: Path) -> list[Path]:
    """Save ``model`` as ``path`` plus ``path.data`` holding every initializer of 1 kB or more.

    Smaller tensors stay inline because ONNX Runtime reads shape constants only from the graph.

    Returns:
        The files written.
    """
    import onnx

    data_name = path.name + EXTERNAL_DATA_SUFFIX
    for stale in (path, path.parent / data_name):
        if stale.exists():
            stale.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024,
    )
    return [path, path.parent / data_name]


# Initializers that are precomputed buffers, not model parameters: the GenAI builder stores the
# rotary embedding's cos/sin tables (67 MB for Gemma-3-270M, whose two RoPE bases need two pairs).
BUFFER_PREFIXES = ("cos_cache", "sin_cache")


def weight_bytes(folder: Path, *, include_buffers: bool = False) -> int:
    """Return the bytes of the ONNX weights in ``folder``: the external data files and inline initializers.

    Args:
        include_buffers: count the precomputed rotary tables too; without it the figure is
            comparable with the checkpoint's parameter bytes.
    """
    import onnx

    total = 0
    for graph_file in folder.glob("*.onnx"):
        model = onnx.load(str(graph_file), load_external_data=False)
        for tensor in model.graph.initializer:
            if not include_buffers and tensor.name.startswith(BUFFER_PREFIXES):
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                total += int(info.get("length", 0))
            else:
                total += len(tensor.raw_data) if tensor.raw_data else onnx.numpy_helper.to_array(tensor).nbytes
    return total


def tie_shared_weights(model) -> list[str]:
    """Store a tied embedding and output head once, as the GenAI builder lays it out.

    An exporter that traces ``lm_head`` and ``embed_tokens`` separately writes the tied matrix
    twice: ``E`` of shape [vocab, hidden] for the Gather and its transpose ``W`` of shape
    [hidden, vocab] for the MatMul. This keeps ``W`` and feeds the Gather ``Transpose(W)``.

    Returns:
        The names of the removed duplicate initializers.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in initializers]
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    removed = []
    for gather in gathers:
        embedding = initializers[gather.input[0]]
        if len(embedding.dims) != 2:
            continue
        vocab, hidden = embedding.dims
        for matmul in matmuls:
            head = initializers.get(matmul.input[1])
            if head is None or list(head.dims) != [hidden, vocab]:
                continue
            if not np.array_equal(numpy_helper.to_array(head), numpy_helper.to_array(embedding).T):
                continue
            transposed = f"{head.name}/transposed_for_embedding"
            # At index 0 the graph stays topologically sorted: the Transpose reads only an initializer.
            graph.node.insert(0, onnx.helper.make_node("Transpose", [head.name], [transposed], perm=[1, 0], name=transposed))
            uses = [n for n in graph.node if embedding.name in n.input]
            for node in uses:
                for index, name in enumerate(node.input):
                    if name == embedding.name:
                        node.input[index] = transposed
            graph.initializer.remove(embedding)
            removed.append(embedding.name)
            break
    if removed:
        logger.info("stored tied weights once; removed %s", ", ".join(removed))
    return removed

