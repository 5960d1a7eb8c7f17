"""The ``llmctl`` application: registers each command module and sets up logging."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl import __version__
from llmctl.cli import convert as convert_cli
from llmctl.cli import cost
from llmctl.cli import info as info_cli
from llmctl.cli import eval as eval_cli
from llmctl.cli import generate
from llmctl.cli import pipeline
from llmctl.cli import profiles
from llmctl.cli import quantize as quantize_cli
from llmctl.cli import serve
from llmctl.cli.errors import LlmctlGroup

app = typer.Typer(
    name="llmctl",
    cls=LlmctlGroup,
    help="Take a language model from a checkpoint to a served, evaluated, priced deployment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(profiles.app, name="profiles")
app.add_typer(pipeline.app, name="pipeline")
app.command("convert")(convert_cli.convert_command)
app.command("quantize")(quantize_cli.quantize_command)
app.command("info")(info_cli.info_command)
app.command("eval")(eval_cli.eval_command)
app.command("generate")(generate.generate_command)
app.command("cost-estimate")(cost.cost_estimate)
app.command("serve")(serve.serve_command)


def _print_version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, metavar="", show_default=False,
            help="More log output on stderr; repeat it: -v info, -vv debug. Give it before the command: llmctl -v convert ...",
        ),
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Take a language model from a checkpoint to a served, evaluated, priced deployment."""
    from llmctl.log import configure_logging

    configure_logging(verbose)


@app.command("completions")
def completions(
    shell: Annotated[str, typer.Argument(metavar="SHELL", help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print a static completion script for SHELL (the files in completions/ are made this way)."""
    from llmctl.cli.completions import SHELLS, completion_script
    from llmctl.errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"unknown shell {shell!r}", hint=f"choose one of: {', '.join(SHELLS)}")
    print(completion_script(typer.main.get_command(app), shell), end="")


def run() -> None:
    """Console-script entry point."""
    app(prog_name="llmctl")
