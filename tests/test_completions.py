"""The shipped completion scripts match the application and work in bash."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llmctl.cli.completions import SHELLS, completion_script
from llmctl.cli.main import app

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"
FILES = {"bash": "llmctl.bash", "zsh": "_llmctl", "fish": "llmctl.fish"}


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_file_up_to_date(shell: str) -> None:
    expected = completion_script(typer.main.get_command(app), shell)
    shipped = (COMPLETIONS / FILES[shell]).read_text(encoding="utf-8")
    assert shipped == expected, f"completions/{FILES[shell]} is out of date: run `llmctl completions {shell} > completions/{FILES[shell]}`"


def _bash_complete(words: list[str]) -> list[str]:
    script = COMPLETIONS / FILES["bash"]
    line = " ".join(words)
    program = (
        f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
        '_llmctl_completion; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_bash_completes_subcommands() -> None:
    assert _bash_complete(["llmctl", "pro"]) == ["profiles"]
    assert _bash_complete(["llmctl", "profiles", "va"]) == ["validate"]


def test_bash_completes_options() -> None:
    assert "--json" in _bash_complete(["llmctl", "profiles", "list", "--"])


def test_bash_completes_choices() -> None:
    assert set(_bash_complete(["llmctl", "quantize", "--method", "''"])) == {"int8", "int4"}
    assert set(_bash_complete(["llmctl", "generate", "--backend", "''"])) == {"auto", "genai", "ort", "torch"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_script_parses() -> None:
    subprocess.run(["zsh", "-n", str(COMPLETIONS / FILES["zsh"])], check=True)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish not installed")
def test_fish_script_parses() -> None:
    subprocess.run(["fish", "--no-execute", str(COMPLETIONS / FILES["fish"])], check=True)


def test_completions_rejects_unknown_shell() -> None:
    result = CliRunner().invoke(app, ["completions", "tcsh"])
    assert result.exit_code == 2
    assert "unknown shell 'tcsh'" in result.output


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish not installed")
def test_fish_completes_subcommands() -> None:
    program = f"source {COMPLETIONS / FILES['fish']}; complete -C 'llmctl profiles va'"
    result = subprocess.run(["fish", "--no-config", "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split("\t")[0].strip() == "validate"
