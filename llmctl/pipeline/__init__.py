"""``llmctl pipeline``: one profile drives convert, quantize, eval gates, selection and a report card."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import InputError

SELECTED_NAME = "selected"
VARIANTS_DIR = "variants"
PIPELINE_MARKER = "report.json"


def resolve_model_dir(path: str | Path) -> Path:
    """Return the artifact folder a model path means, following a pipeline folder's selection.

    A pipeline output folder stands for its selected variant, so ``llmctl serve DIR`` and
    ``llmctl generate DIR`` run the model the pipeline picked. Any other path is returned as
    it is.

    Args:
        path: an artifact folder, a Hugging Face folder, or a pipeline output folder.

    Raises:
        InputError: ``path`` is a pipeline folder whose run selected no variant.
    """
    path = Path(path)
    selected = path / SELECTED_NAME
    if selected.is_symlink() or selected.is_dir():
        return selected.resolve()
    if selected.is_file():
        # A pointer file (for file systems without symbolic links) contains the variant name.
        name = selected.read_text(encoding="utf-8").strip()
        return (path / VARIANTS_DIR / name).resolve()
    if (path / VARIANTS_DIR).is_dir() and (path / PIPELINE_MARKER).is_file():
        raise InputError(
            f"pipeline folder {path} has no selected variant: none passed every gate",
            hint=f"see {path / 'report.md'}, or pass one of {path / VARIANTS_DIR}/NAME",
        )
    return path


__all__ = ["resolve_model_dir"]
