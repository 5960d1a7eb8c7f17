"""``llmctl generate``: run one prompt through a model and stream the answer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import BackendOpt, JsonOpt, ProfileOpt
from llmctl.cli.output import emit_json, stderr

if TYPE_CHECKING:
    from llmctl.runtime.streaming import GenerationResult


def generate_command(
    model: Annotated[Path, typer.Argument(help="Artifact folder (or a Hugging Face folder with --backend torch).")],
    prompt: Annotated[str, typer.Argument(help="The prompt text; '-' reads it from stdin.")],
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the chat template.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Maximum number of tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 disables it.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the K most likely tokens; 0 disables it.")] = 0,
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, max=2**63 - 1, help="Random seed from 0 to 2**63-1; the same seed gives the same output."),
    ] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable); it is not printed.")] = None,
    backend: BackendOpt = "auto",
    profile: ProfileOpt = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=0, help="Intra-op threads, at most the CPU count; 0 lets the runtime choose; default from the profile."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one prompt through a model and stream the answer to stdout; statistics go to stderr."""
    from llmctl.errors import UsageError
    from llmctl.runtime.base import SamplingParams
    from llmctl.runtime.streaming import run_prompt

    if prompt == "-":
        prompt = sys.stdin.read()
    if top_p == 0.0:
        raise UsageError("--top-p 0 keeps no token", hint="use a value in (0, 1], or --temperature 0 for greedy decoding")

    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop or [])
    )
    run = run_prompt(model, prompt, params, chat=chat, backend=backend, profile=profile, threads=threads)

    if as_json:
        for _ in run:
            pass
        emit_json(run.result.to_dict())
        return

    for text in run:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(run.result)


def _print_stats(result: GenerationResult) -> None:
    ttft = f"{result.time_to_first_token_s * 1000:.0f} ms" if result.time_to_first_token_s is not None else "-"
    tps = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else "-"
    stderr.print(
        f"{result.backend}: {result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, "
        f"time to first token {ttft}, decode {tps}, finish reason {result.finish_reason}",
        highlight=False,
    )
