"""Open a GGUF file, check that it is complete, and read its metadata and tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import InputError

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes:
        name: the GGUF name (``blk.0.attn_q.weight``).
        type_name: the GGML type (``"Q4_K"``, ``"F32"``).
        shape: the logical shape in PyTorch order, ``(rows, columns)`` for a matrix.
        data: the stored array as ``gguf.GGUFReader`` maps it: uint8 ``[rows, bytes_per_row]``
            for block-quantized types, the values themselves for float types.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: Any


@dataclass
class GGUFFile:
    """The parts of a GGUF file that transcoding needs."""

    path: Path
    architecture: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the metadata value ``key`` (``llama.attention.head_count``), or ``default``."""
        return self.metadata.get(key, default)

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """Return ``<architecture>.<suffix>`` from the metadata, or ``default``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


def _field_value(reader_field: Any) -> Any:
    try:
        return reader_field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def read_gguf(path: Path, *, with_tokenizer: bool = False) -> GGUFFile:
    """Open and validate a GGUF file without loading its tensor data into memory.

    Args:
        path: the ``.gguf`` file.
        with_tokenizer: also read the ``tokenizer.ggml.*`` arrays (large: one entry per token).

    Returns:
        The architecture, the metadata and the memory-mapped tensors.

    Raises:
        InputError: the file is missing, is not GGUF, or is truncated or corrupt.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} not found", hint="check the path")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as error:
        raise InputError(
            f"{path}: truncated or corrupt GGUF file ({error})".splitlines()[0],
            hint="download or copy the file again and compare its sha256",
        ) from error

    _check_tensor_extents(path, reader)
    metadata = {
        name: _field_value(reader_field)
        for name, reader_field in reader.fields.items()
        if with_tokenizer or not name.startswith("tokenizer.ggml.")
    }
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise InputError(f"{path}: GGUF metadata has no general.architecture", hint="the file is incomplete or not a model")

    tensors = {}
    for tensor in reader.tensors:
        # GGUF stores dimensions innermost first; PyTorch order is the reverse.
        shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = GGUFTensor(tensor.name, tensor.tensor_type.name, shape, tensor.data)
    return GGUFFile(path=path, architecture=architecture, metadata=metadata, tensors=tensors)


def _check_tensor_extents(path: Path, reader: Any) -> None:
    """Raise InputError when a tensor's data runs past the end of the file."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InputError(
                f"{path}: truncated GGUF file: tensor {tensor.name} ends at byte {end}, the file has {size}",
                hint="download or copy the file again and compare its sha256",
            )
