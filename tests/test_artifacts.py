"""Atomic artifact folders and the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.artifacts import (
    Manifest,
    Source,
    atomic_output,
    now_iso,
    read_manifest,
    verify_manifest,
)
from llmctl.errors import InputError, OutputExistsError, UsageError


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with atomic_output(out) as staging:
        (staging / "model.onnx").write_bytes(b"x")
        assert not out.exists()
    assert (out / "model.onnx").read_bytes() == b"x"
    assert _siblings(out) == ["artifact"]


@pytest.mark.parametrize("error", [RuntimeError("failed"), KeyboardInterrupt()])
def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "artifact"
    with pytest.raises(type(error)):
        with atomic_output(out) as staging:
            (staging / "half.onnx").write_bytes(b"x")
            raise error
    assert _siblings(out) == []


def test_atomic_output_refuses_existing_without_force(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(OutputExistsError, match="pass --force"):
        with atomic_output(out):
            pass
    assert (out / "keep").read_text() == "old"


def test_atomic_output_force_replaces_only_when_done(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, force=True):
            raise RuntimeError("failed")
    assert (out / "keep").read_text() == "old"

    with atomic_output(out, force=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _siblings(out) == ["artifact"]


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "file.txt"
    out.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        with atomic_output(out, force=True):
            pass


def _manifest() -> Manifest:
    return Manifest(created_at=now_iso(), source=Source(kind="hf-folder", location="/models/x"))


def test_manifest_round_trip_and_verify(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"more")
    _manifest().write(tmp_path)

    manifest = read_manifest(tmp_path)
    assert [f.path for f in manifest.files] == ["model.onnx", "sub/data.bin"]
    assert verify_manifest(tmp_path, manifest) == []

    (tmp_path / "model.onnx").write_bytes(b"changed")
    (tmp_path / "extra").write_text("?")
    problems = verify_manifest(tmp_path, manifest)
    assert any(p.startswith("model.onnx: sha256") for p in problems)
    assert "extra: not listed in the manifest" in problems


def test_read_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no llmctl.json"):
        read_manifest(tmp_path)
