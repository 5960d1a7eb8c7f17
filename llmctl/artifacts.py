"""Artifact folders: atomic writing and the ``llmctl.json`` manifest.

Every step writes into a temporary sibling of its output folder and renames it into place
only when it has finished. A failed or interrupted run (Ctrl-C and SIGTERM included) therefore
leaves no half-written artifact at the output path. After a SIGKILL the staging folder stays
behind, and the next run that writes the same output removes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmctl import __version__
from llmctl.errors import InputError, OutputExistsError, UsageError

logger = logging.getLogger(__name__)

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
    status: str = Field(
        "ok", description="ok; parity-failed for an artifact kept with --keep-failed; not-validated with --no-validate"
    )
    manifest_sha256: str | None = Field(None, description="sha256 of every other field, to detect edits of this file")

    def content_digest(self) -> str:
        """Return the sha256 of the manifest's fields other than ``manifest_sha256``, in canonical JSON."""
        data = self.model_dump(mode="json", exclude={"manifest_sha256"})
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def write(self, folder: Path) -> Path:
        """Hash every file in ``folder`` into ``files``, seal the result and write the manifest there."""
        self.files = hash_folder(folder)
        self.manifest_sha256 = self.content_digest()
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
        InputError: the folder has no manifest, or it is not valid JSON, was written by a
            newer llmctl, or does not match the manifest schema.
    """
    path = folder / MANIFEST_NAME
    if folder.is_file():
        raise InputError(f"{folder} is a file", hint="pass the artifact folder that contains llmctl.json")
    if not path.is_file():
        raise InputError(f"{folder}: no {MANIFEST_NAME} found", hint="is this a folder written by llmctl convert or quantize?")
    damaged = "the manifest is damaged; rebuild the artifact"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a text file", hint=damaged) from error
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})", hint=damaged) from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}", hint=damaged)

    version = data.get("schema_version")
    if isinstance(version, int) and version > MANIFEST_SCHEMA_VERSION:
        raise InputError(
            f"{path}: written by a newer llmctl (manifest schema {version}; this llmctl reads up to {MANIFEST_SCHEMA_VERSION})",
            hint="upgrade llmctl",
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}" for problem in error.errors()
        )
        raise InputError(f"{path}: invalid manifest: {problems}", hint=damaged) from error


def verify_manifest(folder: Path, manifest: Manifest) -> list[str]:
    """Re-hash the artifact's files and return one message per mismatch (empty when all match).

    The manifest itself is checked against its ``manifest_sha256`` (manifests written before
    that field existed are not).
    """
    problems = []
    if manifest.manifest_sha256 and manifest.content_digest() != manifest.manifest_sha256:
        problems.append(f"{MANIFEST_NAME}: edited after it was written (its content no longer matches manifest_sha256)")
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


def _resolved(path: Path | str) -> Path:
    """Return ``path`` as an absolute path with every symbolic link followed."""
    return Path(os.path.expanduser(str(path))).resolve()


def _is_within(path: Path, folder: Path) -> bool:
    """Return whether resolved ``path`` is ``folder`` or lies under it."""
    return path == folder or folder in path.parents


def _check_against_inputs(out: Path, target: Path, inputs: tuple[Path | str, ...]) -> None:
    """Reject an output folder that would replace, contain or sit inside one of the inputs."""
    for given in inputs:
        source = _resolved(given)
        if _is_within(source, target):
            relation = "is the input" if source == target else "contains the input"
            raise UsageError(
                f"output path {out} {relation} {given}; writing it would delete the input",
                hint="choose an output folder outside the input, e.g. -o {}-onnx".format(source.name or "model"),
            )
        if source.is_dir() and _is_within(target, source):
            raise UsageError(
                f"output path {out} is inside the input folder {given}",
                hint="choose an output folder outside the input folder",
            )


def _check_protected(out: Path, target: Path) -> None:
    """Reject an empty path, the current folder, a folder containing it, the home folder and /."""
    cwd = _resolved(Path.cwd())
    if _is_within(cwd, target):
        what = "the current folder" if cwd == target else f"a parent of the current folder {cwd}"
        raise UsageError(
            f"output path {str(out)!r} resolves to {target}, {what}",
            hint="pass a new folder for -o/--output, e.g. -o ./model-onnx",
        )
    if target == _resolved(Path.home()) or target.parent == target:
        raise UsageError(f"output path {out} is the home or root folder", hint="pass a new folder for -o/--output")


def check_output_path(out: Path | str, force: bool = False, inputs: tuple[Path | str, ...] = ()) -> None:
    """Reject an output path that cannot or must not be written, before any work starts.

    Symbolic links are followed before comparing paths, so a link cannot smuggle an input or
    the current folder past these checks. ``--force`` replaces only a folder that is an
    llmctl artifact (it has ``llmctl.json``) or is empty.

    Args:
        out: the artifact folder to write.
        force: whether an existing artifact folder may be replaced.
        inputs: the paths the step reads; the output must not be, contain or lie inside one.

    Raises:
        UsageError: ``out`` is empty, the current folder or one of its parents, the home or
            root folder, or a symbolic link. It is, contains or lies inside an input. It is an
            existing file or a folder that is not an artifact, or its parent is not writable.
        OutputExistsError: ``out`` is an existing artifact folder and ``force`` is False.
    """
    if not str(out).strip():
        raise UsageError("output path is empty", hint="pass the folder to write with -o/--output")
    out = Path(out)
    target = _resolved(out)
    _check_protected(out, target)
    _check_against_inputs(out, target, inputs)
    if out.is_symlink():
        raise UsageError(
            f"output path {out} is a symbolic link to {target}",
            hint="llmctl does not write through links; pass a new folder for -o/--output",
        )

    if target.exists() and not target.is_dir():
        raise UsageError(f"output path {out} is a file", hint="choose a folder path for -o/--output")
    if target.is_dir() and any(target.iterdir()):
        is_artifact = (target / MANIFEST_NAME).is_file()
        if not is_artifact:
            raise OutputExistsError(
                f"output folder {out} already exists and is not an llmctl artifact folder (it has no {MANIFEST_NAME})",
                hint="remove it yourself or choose another -o/--output",
            )
        if not force:
            raise OutputExistsError(f"output folder {out} already exists", hint="pass --force to replace it")

    check_writable(target.parent)


def check_writable(folder: Path) -> None:
    """Check that ``folder``, or the nearest part of it that exists, is a folder this process can write.

    Raises:
        UsageError: the nearest existing part is a file or is not writable.
    """
    parent = _existing_ancestor(_resolved(folder))
    if not parent.is_dir():
        raise UsageError(f"output parent {parent} is not a folder", hint="choose another -o/--output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {parent}: permission denied", hint="choose another -o/--output")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


# Staging siblings: .NAME.tmp-PID-MILLISECONDS while a step writes, .NAME.old-PID while it swaps.
_STAGING_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<tmp_pid>\d+)-\d+|old-(?P<old_pid>\d+))$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging siblings of ``out`` left by llmctl processes that no longer run.

    A process killed with SIGKILL (or by a power cut) cannot clean up after itself, so its
    staging folder would otherwise stay next to the output for ever.

    Returns:
        The folders removed.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for sibling in out.parent.iterdir():
        match = _STAGING_PATTERN.match(sibling.name)
        if not match or match["name"] != out.name or not sibling.is_dir() or sibling.is_symlink():
            continue
        if _pid_alive(int(match["tmp_pid"] or match["old_pid"])):
            continue
        logger.info("removing %s, left by an interrupted run", sibling)
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
    return removed


def _apply_default_modes(folder: Path) -> None:
    """Give every file the mode the umask allows (0644 by default).

    Some writers (ONNX Runtime's quantizer among them) create files with mode 0600 through
    ``tempfile``, and a server running as another user could not read them.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


def _make_staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except PermissionError as error:
        raise UsageError(f"cannot write to {error.filename or out.parent}: permission denied", hint="choose another -o/--output") from error
    except OSError as error:
        raise UsageError(f"cannot create {error.filename or staging}: {error.strerror}", hint="choose another -o/--output") from error
    return staging


# Write failures that come from the output location, not from the step's own logic.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def atomic_output(out: Path | str, force: bool = False, inputs: tuple[Path | str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out`` and rename it to ``out`` on success.

    On any exception, KeyboardInterrupt included, the temporary folder is removed and
    ``out`` is left as it was. With ``force``, an existing artifact folder ``out`` is replaced
    only after the new folder is complete. Staging folders of dead processes are removed first.

    Args:
        out: the artifact folder to write.
        force: whether an existing artifact folder may be replaced.
        inputs: the paths the step reads (see ``check_output_path``).

    Raises:
        UsageError: see ``check_output_path``; also a full disk or a folder that turned
            read-only while the step wrote into it.
    """
    check_output_path(out, force, inputs)
    out = _resolved(out)
    remove_stale_staging(out)
    staging = _make_staging(out)
    try:
        yield staging
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in _OUTPUT_ERRNOS:
            raise UsageError(
                f"cannot write {error.filename or out}: {error.strerror}", hint="free some space or choose another -o/--output"
            ) from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _apply_default_modes(staging)
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
