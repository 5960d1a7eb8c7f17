"""The interface every exporter implements."""

from __future__ import annotations

import abc
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmctl.convert.source import ResolvedSource

# Files of a checkpoint folder that an artifact carries next to the ONNX model.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json",
)


@dataclass
class ExportResult:
    """What an exporter wrote.

    Attributes:
        runtime: ``genai`` when the ONNX Runtime GenAI runtime can run the folder, else ``ort``.
        task: the optimum task name of the exported graph.
        details: exporter-specific facts for the manifest.
    """

    runtime: str
    task: str
    details: dict[str, Any] = field(default_factory=dict)


class Exporter(abc.ABC):
    """Turns a checkpoint folder into an ONNX folder."""

    name: ClassVar[str] = "base"

    @abc.abstractmethod
    def supported_architectures(self) -> list[str]:
        """Return the architectures (or model types) this exporter handles, sorted."""

    @abc.abstractmethod
    def supports(self, source: ResolvedSource) -> bool:
        """Return whether this exporter handles the source's architecture."""

    @abc.abstractmethod
    def export(self, source: ResolvedSource, out_dir: Path, *, dtype: str, workdir: Path, execution_provider: str = "cpu") -> ExportResult:
        """Write the ONNX model and its side files into ``out_dir``.

        ``execution_provider`` is the ONNX Runtime provider the artifact targets (``cpu``,
        ``cuda``, ...); an exporter that builds one graph for every provider ignores it.

        Raises:
            UnsupportedError: the architecture or dtype is not supported.
            ConversionError: the export failed.
        """


def copy_side_files(source_folder: Path, out_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files that ``out_dir`` still lacks.

    ``tokenizer.json`` is then rewritten without indentation: transformers' save_pretrained
    indents it, which doubles its size (3.5 MB against 1.6 MB for SmolLM2) for the same content.
    """
    copied = []
    for name in SIDE_FILES:
        src = source_folder / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)
            copied.append(name)

    tokenizer_file = out_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(tokenizer_file)).save(str(tokenizer_file), pretty=False)
    return copied
