"""Atomic artifact folders and the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmctl.artifacts import (
    Manifest,
    Source,
    atomic_output,
    check_output_path,
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
    (out / "llmctl.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="pass --force"):
        with atomic_output(out):
            pass
    assert (out / "keep").read_text() == "old"


def test_atomic_output_force_replaces_only_when_done(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep").write_text("old")
    (out / "llmctl.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_output(out, force=True):
            raise RuntimeError("failed")
    assert (out / "keep").read_text() == "old"

    with atomic_output(out, force=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _siblings(out) == ["artifact"]


def test_force_keeps_folder_that_is_not_artifact(tmp_path: Path) -> None:
    out = tmp_path / "mydocs"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not an llmctl artifact folder"):
        with atomic_output(out, force=True):
            pass
    assert (out / "notes.txt").read_text() == "precious"


def test_force_fills_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    with atomic_output(out, force=True) as staging:
        (staging / "model.onnx").write_bytes(b"x")
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("path", ["", "."])
def test_output_current_folder_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("precious")
    (tmp_path / "llmctl.json").write_text("{}")
    with pytest.raises(UsageError, match="empty|current folder"):
        with atomic_output(path, force=True):
            pass
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_output_parent_of_current_folder_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(UsageError, match="parent of the current folder"):
        check_output_path(tmp_path / "project", force=True)


def test_output_equal_to_input_rejected_without_force_hint(tmp_path: Path) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "llmctl.json").write_text("{}")
    with pytest.raises(UsageError, match="is the input") as caught:
        check_output_path(source, force=True, inputs=(source,))
    assert "--force" not in str(caught.value)


def test_output_containing_input_rejected(tmp_path: Path) -> None:
    source = tmp_path / "par" / "src"
    source.mkdir(parents=True)
    with pytest.raises(UsageError, match="contains the input"):
        check_output_path(tmp_path / "par", force=True, inputs=(source,))


def test_output_inside_input_rejected(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    with pytest.raises(UsageError, match="inside the input folder"):
        check_output_path(source / "onnx", inputs=(source,))


def test_output_symlink_rejected_and_target_kept(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "llmctl.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        with atomic_output(link, force=True):
            pass
    assert (target / "llmctl.json").is_file()


def test_output_symlink_to_input_rejected(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    link = tmp_path / "link"
    link.symlink_to(source)
    with pytest.raises(UsageError, match="is the input"):
        check_output_path(link, force=True, inputs=(source,))


def test_output_unwritable_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def fail(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", fail)
    with pytest.raises(UsageError, match="permission denied"):
        with atomic_output(tmp_path / "ro" / "model"):
            pass


def test_stale_staging_of_dead_process_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".artifact.tmp-{pid}-1"
    stale.mkdir()
    live = tmp_path / f".artifact.tmp-{os.getpid()}-1"
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-1"
    other.mkdir()
    with atomic_output(tmp_path / "artifact") as staging:
        (staging / "x").write_text("x")
    assert not stale.exists()
    assert live.exists()
    assert other.exists()


def test_files_get_umask_mode(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with atomic_output(out) as staging:
        data = staging / "model.onnx.data"
        data.write_bytes(b"x")
        data.chmod(0o600)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.onnx.data").stat().st_mode & 0o777 == 0o666 & ~umask


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


SIGTERM_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
import typer
from llmctl.artifacts import atomic_output
from llmctl.cli.errors import LlmctlGroup

app = typer.Typer(cls=LlmctlGroup)

@app.command()
def write(out: Path) -> None:
    with atomic_output(out) as staging:
        (staging / "half.onnx").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

@app.command()
def other() -> None:
    pass

app()
"""


def test_sigterm_removes_staging_and_exits_143(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "artifact"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, "write", str(out)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 143, result.stderr
    assert "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_edited_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"weights")
    manifest = _manifest()
    manifest.status = "parity-failed"
    manifest.write(tmp_path)
    assert verify_manifest(tmp_path, read_manifest(tmp_path)) == []

    path = tmp_path / "llmctl.json"
    path.write_text(path.read_text().replace('"parity-failed"', '"ok"'))
    problems = verify_manifest(tmp_path, read_manifest(tmp_path))
    assert len(problems) == 1
    assert problems[0].startswith("llmctl.json: edited after it was written")


def test_read_manifest_truncated_json(tmp_path: Path) -> None:
    _manifest().write(tmp_path)
    path = tmp_path / "llmctl.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_read_manifest_newer_schema(tmp_path: Path) -> None:
    (tmp_path / "llmctl.json").write_text('{"schema_version": 99}')
    with pytest.raises(InputError, match="newer llmctl"):
        read_manifest(tmp_path)


def test_read_manifest_names_invalid_field(tmp_path: Path) -> None:
    (tmp_path / "llmctl.json").write_text('{"created_at": "now", "source": {"kind": "x"}}')
    with pytest.raises(InputError, match="source.location"):
        read_manifest(tmp_path)
