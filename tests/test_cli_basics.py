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
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert "ConversionError: export failed" in result.stderr


def test_unknown_exception_keeps_traceback() -> None:
    result = runner.invoke(_app_raising(RuntimeError("bug")), ["boom"])
    assert isinstance(result.exception, RuntimeError)


def test_unknown_profile_names_builtins() -> None:
    result = runner.invoke(app, ["profiles", "show", "no-such-profile"])
    assert result.exit_code == 2
    assert "unknown profile 'no-such-profile'" in result.output
    assert "cpu-x86-avx2" in result.output


# --- help texts -------------------------------------------------------------------------------


def help_row(text: str, option: str) -> str:
    """Return the help line that starts the row of ``option``."""
    return next(line for line in text.splitlines() if f" {option} " in line)


def test_help_flags_show_no_bool_metavar() -> None:
    result = runner.invoke(app, ["cost-estimate", "--help"])
    assert result.exit_code == 0
    for flag in ("--json", "--all-profiles"):
        assert "<bool>" not in help_row(result.output, flag)


def test_help_options_show_placeholders_not_types() -> None:
    result = runner.invoke(app, ["cost-estimate", "--help"])
    options = result.output.split("Options")[1]  # Typer 0.29 always shows an argument's type
    for type_name in ("<float>", "<str>", "<int>", "<list[str]>", "<path>"):
        assert type_name not in options
    assert "$LLMCTL_PROFILE" in result.output
    assert "{model}" not in result.output


def test_help_verbose_reads_as_repeatable_flag() -> None:
    result = runner.invoke(app, ["--help"])
    row = help_row(result.output, "--verbose")
    assert "<int>" not in row
    assert "-vv" in result.output
    assert "before the command" in result.output


# --- tables -----------------------------------------------------------------------------------


def wide_table():
    from rich.table import Table

    table = Table("profile", "hardware", "price per hour", "status")
    for name in ("gpu-nvidia-a100-80gb", "gpu-nvidia-h100-80gb", "cpu-arm64-graviton3-c7g"):
        table.add_row(name, "a long hardware description that can wrap", "1.640", "see note 1")
    return table


def test_print_table_narrow_terminal_cuts_nothing() -> None:
    import io

    from rich.console import Console

    from llmctl.cli.output import print_table

    console = Console(file=io.StringIO(), width=40, force_terminal=True, color_system=None)
    print_table(wide_table(), console)
    text = console.file.getvalue()
    assert "…" not in text
    assert "gpu-nvidia-a100-80gb" in text
    assert "cpu-arm64-graviton3-c7g" in text
    assert "description" in text


def test_print_table_terminal_fits_width_when_it_can() -> None:
    import io

    from rich.console import Console

    from llmctl.cli.output import print_table

    console = Console(file=io.StringIO(), width=70, force_terminal=True, color_system=None)
    print_table(wide_table(), console)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 70
    assert "…" not in "\n".join(lines)


def test_print_table_pipe_keeps_natural_width() -> None:
    import io

    from rich.console import Console

    from llmctl.cli.output import print_table

    console = Console(file=io.StringIO(), width=40)
    print_table(wide_table(), console)
    lines = console.file.getvalue().splitlines()
    assert "a long hardware description that can wrap" in lines[3]
    assert len(lines) == 7  # top rule, header, rule, three rows, bottom rule
