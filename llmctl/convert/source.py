"""Resolving a convert SOURCE into a local Hugging Face checkpoint folder.

A SOURCE is a local checkpoint folder, a ``.gguf`` file, or a hub id. A GGUF file is loaded
through transformers' GGUF support (which dequantizes it to fp32) and saved as a temporary
checkpoint folder, so every exporter only ever sees a plain Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.artifacts import FileEntry, sha256_file
from llmctl.errors import InputError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# A hub id is "name" or "owner/name" made of the characters the hub allows.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass
class ResolvedSource:
    """A SOURCE turned into a local checkpoint folder.

    Attributes:
        kind: ``hf-folder``, ``gguf`` or ``hub-id``.
        location: the SOURCE as given (a resolved path for local files).
        folder: the checkpoint folder the exporters read.
        config: the parsed ``config.json``.
        weights: size and sha256 of the source's weight files.
    """

    kind: str
    location: str
    folder: Path
    config: dict[str, Any]
    weights: list[FileEntry] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        architectures = self.config.get("architectures") or []
        return architectures[0] if architectures else ""

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def resolve_source(source: str, workdir: Path) -> ResolvedSource:
    """Turn SOURCE into a local checkpoint folder, checking it before any export starts.

    Args:
        source: a checkpoint folder, a ``.gguf`` file or a hub id.
        workdir: a scratch folder; a GGUF source is dequantized into it.

    Returns:
        The resolved source.

    Raises:
        InputError: the path is missing, the folder has no ``config.json``, a weight file is
            corrupt or truncated, or a hub id is not in the local cache while offline.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_folder(path, kind="hf-folder", location=str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(
                f"{path}: not a checkpoint folder or a .gguf file",
                hint="pass a Hugging Face checkpoint folder (with config.json), a .gguf file or a hub id",
            )
        return _resolve_gguf(path, workdir)
    if _looks_like_path(source):
        raise InputError(f"{source}: path not found", hint="check the path, or pass a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    return _resolve_hub_id(source)


def _looks_like_path(source: str) -> bool:
    return (
        not HUB_ID_PATTERN.match(source)
        or source.startswith((".", "~"))
        or source.lower().endswith(WEIGHT_SUFFIXES)
        or source.count("/") > 1
    )


def _resolve_folder(folder: Path, *, kind: str, location: str) -> ResolvedSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{folder}: no config.json in this folder",
            hint="pass a Hugging Face checkpoint folder as written by save_pretrained, or a .gguf file",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(
            f"{config_path}: invalid JSON: {error}", hint="save the checkpoint again, or fix config.json by hand"
        ) from error
    if not isinstance(config, dict) or not (config.get("architectures") or config.get("model_type")):
        raise InputError(
            f"{config_path}: config.json has no architectures or model_type",
            hint="save the checkpoint again with save_pretrained, which writes both",
        )

    weight_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weight_files:
        raise InputError(f"{folder}: no weight files (*.safetensors, *.bin) in this folder", hint="copy the model's weights next to config.json")
    for weight_file in weight_files:
        if weight_file.suffix == ".safetensors":
            check_safetensors(weight_file)
    weights = [FileEntry(path=p.name, bytes=p.stat().st_size, sha256=sha256_file(p)) for p in weight_files]
    return ResolvedSource(kind=kind, location=location, folder=folder, config=config, weights=weights)


def check_safetensors(path: Path) -> None:
    """Check that a safetensors file's header parses and that its data is all there.

    Raises:
        InputError: the file is corrupt or truncated.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length <= 0 or 8 + header_length > size:
                raise ValueError(f"header length {header_length} exceeds the file size {size}")
            header = json.loads(handle.read(header_length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: corrupt safetensors file: {error}", hint="download or save the checkpoint again") from error

    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_length + data_end > size:
        raise InputError(
            f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + header_length + data_end})",
            hint="download or save the checkpoint again",
        )


def check_gguf(path: Path) -> None:
    """Check a GGUF file's magic number and that every tensor it lists is inside the file.

    Raises:
        InputError: the file is not GGUF, or is corrupt or truncated.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", hint="pass a .gguf file written by llama.cpp")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, struct.error, OSError) as error:
        raise InputError(f"{path}: corrupt or truncated GGUF file: {error}", hint="download the file again") from error
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise InputError(f"{path}: truncated GGUF file: tensor {tensor.name} ends past the end of the file", hint="download the file again")


def _resolve_gguf(path: Path, workdir: Path) -> ResolvedSource:
    check_gguf(path)
    folder = workdir / "gguf-checkpoint"
    logger.info("dequantizing %s into a temporary checkpoint", path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{path}: transformers cannot load this GGUF file: {first_line}", hint="check that transformers supports its architecture") from error
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        # save_pretrained indents tokenizer.json, which doubles its size (3.5 MB against
        # 1.6 MB for SmolLM2); the compact form loads the same.
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"), pretty=False)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    del model
    remove_gguf_copies(folder)

    weights = [FileEntry(path=path.name, bytes=path.stat().st_size, sha256=sha256_file(path))]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return ResolvedSource(kind="gguf", location=str(path.resolve()), folder=folder, config=config, weights=weights)


def remove_gguf_copies(folder: Path) -> list[str]:
    """Delete files in ``folder`` that are whole GGUF files, and return their names.

    A tokenizer loaded from GGUF keeps the GGUF path as its vocabulary file, so
    ``save_pretrained`` writes the entire GGUF file again as ``tokenizer.model``.
    """
    removed = []
    for path in folder.iterdir():
        if not path.is_file():
            continue
        with open(path, "rb") as handle:
            is_gguf = handle.read(4) == GGUF_MAGIC
        if is_gguf or path.suffix == ".gguf":
            path.unlink()
            removed.append(path.name)
    if removed:
        logger.info("removed GGUF copies from the checkpoint: %s", ", ".join(sorted(removed)))
    return removed


def _resolve_hub_id(repo_id: str) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        )
    except LocalEntryNotFoundError as error:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached",
            hint="download the checkpoint on a connected machine and pass its folder path instead",
        ) from error
    except RepositoryNotFoundError as error:
        raise InputError(f"{repo_id}: no such model on the Hugging Face hub", hint="check the id, or pass a local folder path") from error
    except (HfHubHTTPError, OSError) as error:
        raise InputError(
            f"{repo_id}: download failed: {str(error).splitlines()[0]}",
            hint="pass a local checkpoint folder instead",
        ) from error
    return _resolve_folder(folder, kind="hub-id", location=repo_id)
