"""Step outputs cached under the pipeline folder, keyed by each step's hash.

Layout of ``DIR/cache/``::

    convert-<key16>/output/      the step's artifact (written through ``atomic_output``)
    convert-<key16>/step.json    the completed marker, written last
    hashes.json                  content hashes of input files, keyed by path, size and mtime

A step counts as done only when its marker exists and records the full key. A run killed
in the middle of a step leaves at most a temporary folder, which the next run removes before
it builds that step again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.artifacts import MANIFEST_NAME, now_iso, read_manifest, sha256_file, verify_manifest
from llmctl.errors import InputError, UsageError
from llmctl.pipeline.plan import PlannedStep

logger = logging.getLogger(__name__)

MARKER_NAME = "step.json"
OUTPUT_NAME = "output"
HASHES_NAME = "hashes.json"
LOCK_NAME = ".lock"


class StepCache:
    """The cache entries of one pipeline folder."""

    def __init__(self, root: Path, *, persist: bool = True) -> None:
        self.root = Path(root)
        self.persist = persist
        self._memo: dict[str, str] | None = None

    def entry(self, step: PlannedStep) -> Path:
        """Return the folder of the step's cache entry."""
        return self.root / step.cache_name

    def output(self, step: PlannedStep) -> Path:
        """Return where the step's output lives once it is done."""
        return self.entry(step) / OUTPUT_NAME

    def marker(self, step: PlannedStep) -> dict[str, Any] | None:
        """Return the completed marker of the step, or None when the step has not finished."""
        path = self.entry(step) / MARKER_NAME
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != step.key:
            return None
        if not self.output(step).exists():
            return None
        if not output_intact(self.output(step), path):
            logger.warning("the cached output of %s was changed after it was written; building it again", step.label)
            return None
        return record

    def is_done(self, step: PlannedStep) -> bool:
        """Return True when the step's output is complete and can be reused."""
        return self.marker(step) is not None

    def prepare(self, step: PlannedStep) -> Path:
        """Clear what an interrupted attempt at the step left behind and return its entry folder.

        An output without a marker (the process died between finishing the output and writing
        the marker) is removed too: nothing guarantees it matches the key.
        """
        entry = self.entry(step)
        entry.mkdir(parents=True, exist_ok=True)
        for leftover in entry.glob(f".{OUTPUT_NAME}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        (entry / MARKER_NAME).unlink(missing_ok=True)
        if self.output(step).exists():
            shutil.rmtree(self.output(step))
        return entry

    def complete(self, step: PlannedStep, record: dict[str, Any]) -> dict[str, Any]:
        """Write the step's completed marker atomically and return it.

        Args:
            step: the finished step.
            record: details kept with the marker (duration, summary).
        """
        marker = {
            "key": step.key,
            "kind": step.kind,
            "variant": step.variant,
            "parameters": step.parameters,
            "inputs": step.inputs,
            "finished_at": now_iso(),
            **record,
        }
        path = self.entry(step) / MARKER_NAME
        staging = path.with_name(f".{MARKER_NAME}.tmp-{os.getpid()}")
        staging.write_text(json.dumps(marker, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(staging, path)
        return marker

    def content_hash(self, path: Path) -> str:
        """Return the sha256 of a file, or of a folder's files and their relative names.

        Hashes are remembered by path, size and modification time in ``hashes.json``, so an
        unchanged 100 MB source is read once, not on every rerun.
        """
        path = Path(path).resolve()
        if path.is_dir():
            return self._folder_hash(path)
        return self._file_hash(path)

    def _file_hash(self, path: Path) -> str:
        stat = path.stat()
        memo_key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        memo = self._read_hashes()
        if memo_key not in memo:
            memo[memo_key] = sha256_file(path)
            self._write_hashes(memo)
        return memo[memo_key]

    def _folder_hash(self, folder: Path) -> str:
        import hashlib

        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
            digest.update(self._file_hash(path).encode("ascii") + b"\n")
        return digest.hexdigest()

    def _read_hashes(self) -> dict[str, str]:
        if self._memo is None:
            try:
                data = json.loads((self.root / HASHES_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            self._memo = data if isinstance(data, dict) else {}
        return self._memo

    def _write_hashes(self, memo: dict[str, str]) -> None:
        if not self.persist:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / HASHES_NAME
        staging = path.with_name(f".{HASHES_NAME}.tmp-{os.getpid()}")
        staging.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, path)


def output_intact(output: Path, marker: Path) -> bool:
    """Return whether an artifact folder still matches its manifest.

    Sizes and the set of files are checked on every reuse. The sha256 of every file is
    checked again only when a file or the manifest was modified after the step's marker
    was written, so an unchanged cache costs a few ``stat`` calls.
    Folders without a manifest (eval results) count as intact.
    """
    manifest_path = output / MANIFEST_NAME
    if not manifest_path.is_file():
        return True
    try:
        manifest = read_manifest(output)
    except InputError:
        return False
    marker_time = marker.stat().st_mtime_ns
    present = {p.relative_to(output).as_posix(): p for p in output.rglob("*") if p.is_file()}
    present.pop(MANIFEST_NAME, None)
    if set(present) != {entry.path for entry in manifest.files}:
        return False

    modified_later = manifest_path.stat().st_mtime_ns > marker_time
    for entry in manifest.files:
        stat = present[entry.path].stat()
        if stat.st_size != entry.bytes:
            return False
        modified_later = modified_later or stat.st_mtime_ns > marker_time
    return not modified_later or not verify_manifest(output, manifest)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the pipeline folder for the duration of a run.

    Raises:
        UsageError: another pipeline run holds the lock.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "w", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another pipeline run is using {folder}", hint="wait for it to finish or choose another -o folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
