"""The application shell: help, version, error reporting, start-up cost."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

from llmctl import __version__
from llmctl.cli.errors import LlmctlGroup
from llmctl.cli.main import app
from llmctl.errors import ConversionError, InputError

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "profiles" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"llmctl {__version__}"


def test_python_dash_m_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "llmctl", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_help_imports_no_heavy_modules() -> None:
    code = (
        "import sys; from llmctl.cli.main import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'optimum', 'onnxruntime_genai', 'fastapi') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _app_raising(error: BaseException) -> typer.Typer:
    failing = typer.Typer(cls=LlmctlGroup)

    @failing.command()
    def boom() -> None:
        raise error

    @failing.command()
    def other() -> None:
        pass

    return failing


def test_usage_error_is_one_line_exit_2() -> None:
    result = runner.invoke(_app_raising(InputError("model folder /x not found", hint="check the path")), ["boom"])
    assert result.exit_code == 2
    assert "error: model folder /x not found" in result.output
    assert "hint: check the path" in result.output
    assert "Traceback" not in result.output


def test_failure_exits_1() -> None:
    result = runner.invoke(_app_raising(ConversionError("export failed")), ["boom"])
    assert result.exit_code == 1
    assert "error: export failed" in result.output


def test_keyboard_interrupt_exits_130() -> None:
    result = runner.invoke(_app_raising(KeyboardInterrupt()), ["boom"])
    assert result.exit_code == 130
    assert "interrupted" in result.output


def test_debug_variable_keeps_traceback(monkeypatch) -> None:
    monkeypatch.setenv("LLMCTL_DEBUG", "1")
    result = runner.invoke(_app_raising(ConversionError("export failed")), ["boom"])
    assert isinstance(result.exception, ConversionError)


def test_unknown_exception_keeps_traceback() -> None:
    result = runner.invoke(_app_raising(RuntimeError("bug")), ["boom"])
    assert isinstance(result.exception, RuntimeError)


def test_unknown_profile_names_builtins() -> None:
    result = runner.invoke(app, ["profiles", "show", "no-such-profile"])
    assert result.exit_code == 2
    assert "unknown profile 'no-such-profile'" in result.output
    assert "cpu-x86-avx2" in result.output
