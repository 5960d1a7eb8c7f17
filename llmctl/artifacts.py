"""Artifact folders: atomic writing and the ``llmctl.json`` manifest.

Every step writes into a temporary sibling of its output folder and renames it into place
only when it has finished, so an interrupted or failed run (Ctrl-C included) never leaves a
half-written artifact where the next step or a user would pick it up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmctl import __version__
from llmctl.errors import InputError, OutputExistsError, UsageError

MANIFEST_NAME = "llmctl.json"
MANIFEST_SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
    "onnxruntime-genai", "onnx-ir", "gguf",
)


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Return the installed versions of the named packages, plus Python and llmctl."""
    versions = {"python": platform.python_version(), "llmctl": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class FileEntry(BaseModel):
    path: str
    bytes: int
    sha256: str


class Step(BaseModel):
    """One step that produced or changed the artifact."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="convert, quantize, ...")
    component: str = Field(description="registered exporter or quantizer that ran")
    parameters: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    started_at: str
    duration_s: float
    parity: dict[str, Any] | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


class Source(BaseModel):
    model_config = ConfigDict(extra="allow")

    kind: str = Field(description="hf-folder, gguf, hub-id or artifact")
    location: str
    weights: list[FileEntry] = Field(default_factory=list)


class Manifest(BaseModel):
    """The contents of ``llmctl.json``."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    llmctl_version: str = __version__
    created_at: str
    source: Source
    model: dict[str, Any] = Field(default_factory=dict, description="architecture, model_type, task, runtime")
    profile: dict[str, Any] | None = None
    steps: list[Step] = Field(default_factory=list)
    files: list[FileEntry] = Field(default_factory=list)
    status: str = Field("ok", description="ok, or parity-failed for an artifact kept with --keep-failed")

    def write(self, folder: Path) -> Path:
        """Hash every file in ``folder`` into ``files`` and write the manifest there."""
        self.files = hash_folder(folder)
        path = folder / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def hash_folder(folder: Path) -> list[FileEntry]:
    """Return size and sha256 of every file under ``folder`` except the manifest."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        entries.append(FileEntry(path=relative, bytes=path.stat().st_size, sha256=sha256_file(path)))
    return entries


def folder_bytes(folder: Path) -> int:
    """Return the total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_manifest(folder: Path) -> Manifest:
    """Load ``llmctl.json`` from an artifact folder.

    Raises:
        InputError: the folder has no manifest or it is not valid.
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no {MANIFEST_NAME} found", hint="is this a folder written by llmctl convert or quantize?")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(f"{path}: invalid manifest: {error}".splitlines()[0]) from error


def verify_manifest(folder: Path, manifest: Manifest) -> list[str]:
    """Re-hash the artifact's files and return one message per mismatch (empty when all match)."""
    problems = []
    listed = {entry.path: entry for entry in manifest.files}
    present = {entry.path: entry for entry in hash_folder(folder)}
    for name, entry in listed.items():
        actual = present.get(name)
        if actual is None:
            problems.append(f"{name}: missing")
        elif actual.bytes != entry.bytes or actual.sha256 != entry.sha256:
            problems.append(f"{name}: sha256 {actual.sha256[:12]}… does not match the manifest's {entry.sha256[:12]}…")
    for name in sorted(set(present) - set(listed)):
        problems.append(f"{name}: not listed in the manifest")
    return problems


def check_output_path(out: Path, force: bool) -> None:
    """Reject an output path that cannot be written before any work starts.

    Raises:
        UsageError: ``out`` is an existing file, or its parent is not a writable folder.
        OutputExistsError: ``out`` is an existing folder and ``force`` is False.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file", hint="choose a folder path for -o/--output")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"output folder {out} already exists", hint="pass --force to replace it")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"output parent {parent} is not a folder")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out`` and rename it to ``out`` on success.

    On any exception, KeyboardInterrupt included, the temporary folder is removed and
    ``out`` is left as it was. With ``force``, an existing ``out`` is replaced only after
    the new folder is complete.
    """
    check_output_path(out, force)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(backup)
    try:
        staging.rename(out)
    except BaseException:
        if backup is not None:
            backup.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def dump_json(data: Any) -> str:
    """Serialize results for ``--json`` output."""
    return json.dumps(data, indent=2, default=str, sort_keys=False)
