"""The schema of an eval suite: tasks, their data files and sample limits, and the gates.

A suite is a YAML file validated like a profile: every model forbids unknown keys, so a typo
is an error and not a silently ignored setting. Gate expressions are parsed and their metric
names checked against the metrics the suite's tasks produce when the suite is loaded, before
any model runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmctl.errors import InputError

ENV_DATASETS = "LLMCTL_DATASETS"
DATASETS_VARIABLE = "${" + ENV_DATASETS + "}"

PositiveInt = Annotated[int, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="prefix of the task's metric names")
    limit: PositiveInt | None = Field(None, description="samples drawn with the seed; None uses every sample")


class PerplexityTask(TaskBase):
    """Perplexity of a text file with a sliding window."""

    type: Literal["perplexity"]
    data: str = Field(description="UTF-8 text file, scored as one document")
    context: PositiveInt = Field(512, description="tokens per window; capped at the model's context length")
    stride: PositiveInt | None = Field(None, description="tokens the window moves by; None equals context")
    max_tokens: PositiveInt | None = Field(None, description="score only the first N tokens of the file")

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityTask:
        if self.stride is not None and self.stride > self.context:
            raise ValueError(f"stride {self.stride} is larger than context {self.context}; tokens would be skipped")
        return self


class ChoiceMapping(Strict):
    """How to read a multiple-choice record of any JSONL file.

    ``context`` is a template in which ``{field}`` (dotted for nested objects, e.g.
    ``{question.stem}``) is replaced by the record's value.
    """

    context: str = Field(description="template of the text before each choice")
    choices: str | list[str] = Field(description="a field holding a list of strings, or a list of fields")
    label: str = Field(description="field holding the gold choice: 0-based index, letter A-Z, or the choice text")


class MultipleChoiceTask(TaskBase):
    """Accuracy by the log-likelihood of each choice."""

    type: Literal["multiple_choice"]
    data: str
    format: Literal["hellaswag", "arc", "piqa", "boolq", "custom"]
    labels: str | None = Field(None, description="file with one gold index per line (PIQA's valid-labels.lst)")
    mapping: ChoiceMapping | None = Field(None, description="required by format: custom")

    @model_validator(mode="after")
    def _mapping_matches_format(self) -> MultipleChoiceTask:
        if self.format == "custom" and self.mapping is None:
            raise ValueError("format 'custom' needs a mapping with context, choices and label")
        if self.format != "custom" and self.mapping is not None:
            raise ValueError(f"format {self.format!r} has a built-in mapping; use format 'custom' to declare one")
        if self.format == "piqa" and self.labels is None:
            raise ValueError("format 'piqa' needs labels: the valid-labels.lst file next to the JSONL")
        return self


class GenerationTask(TaskBase):
    """Greedy generation scored against an expected answer."""

    type: Literal["generation"]
    data: str = Field(description="JSONL with a prompt (string) or messages (chat list) and an answer per line")
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    answer_field: str = Field("answer", description="a string or a list of accepted strings (patterns for regex)")
    scorer: Literal["exact", "contains", "regex"] = "exact"
    ignore_case: bool = False
    chat: bool = Field(False, description="render a plain prompt through the chat template as one user message")
    max_tokens: PositiveInt = 32
    stop: list[str] = Field(default_factory=list)


class ParityTask(TaskBase):
    """Next-token agreement with the reference model given by ``--reference``."""

    type: Literal["parity"]
    data: str | None = Field(None, description="text file the prompts are cut from; None uses built-in prompts")
    samples: PositiveInt = Field(8, description="prompts compared")
    length: PositiveInt = Field(64, description="tokens per prompt")
    greedy_tokens: PositiveInt = Field(16, description="tokens generated greedily by both models per prompt")


class SpeedTask(TaskBase):
    """Time to first token, prefill and decode throughput, peak memory."""

    type: Literal["speed"]
    prompt_tokens: PositiveInt = 128
    output_tokens: PositiveInt = 64
    repeats: PositiveInt = Field(3, description="timed runs after one warm-up run; medians are reported")


Task = Annotated[
    PerplexityTask | MultipleChoiceTask | GenerationTask | ParityTask | SpeedTask,
    Field(discriminator="type"),
]

# Metric names each task type produces; a gate may name only these.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity", "nll", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "generation": ("accuracy",),
    "parity": ("kl_mean", "top1_agreement", "greedy_agreement", "max_logit_diff"),
    "speed": ("ttft_ms", "prefill_tps", "decode_tps", "peak_memory_mb"),
}
# Metrics that are proportions of samples, to which a Wilson interval applies.
PROPORTION_METRICS = {"acc", "acc_norm", "accuracy", "top1_agreement", "greedy_agreement"}


class Suite(Strict):
    """A list of tasks and the gates their metrics must pass."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    tasks: list[Task] = Field(min_length=1)
    gates: list[str] = Field(default_factory=list, description="gate expressions such as 'hellaswag.acc >= 0.35'")

    @model_validator(mode="after")
    def _unique_task_names(self) -> Suite:
        names = [task.name for task in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def metric_names(self) -> list[str]:
        """Return every ``task.metric`` name the suite's tasks produce."""
        return [f"{task.name}.{metric}" for task in self.tasks for metric in TASK_METRICS[task.type]]


def builtin_suite_dir() -> Path:
    """Return the folder of the built-in suites."""
    return Path(__file__).resolve().parent / "suites"


def builtin_suite_names() -> list[str]:
    """Return the names of the built-in suites, sorted."""
    return sorted(p.stem for p in builtin_suite_dir().glob("*.yaml"))


def load_suite(name_or_path: str | Path) -> tuple[Suite, Path]:
    """Load a built-in suite by name or a suite file by path.

    Returns:
        The validated suite and the file it came from (relative data paths resolve against
        that file's folder).

    Raises:
        InputError: no built-in of that name and no such file, or the suite does not validate;
            the message has one ``file: field: message`` line per problem.
    """
    from llmctl.errors import ProfileError
    from llmctl.profiles.loader import load_yaml_model

    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if not (candidate.suffix in {".yaml", ".yml"} or os.sep in text or candidate.is_file()):
        builtin = builtin_suite_dir() / f"{text}.yaml"
        if not builtin.is_file():
            known = ", ".join(builtin_suite_names())
            raise InputError(f"unknown suite {text!r}", hint=f"built-in suites: {known}; or pass a path to a YAML file")
        candidate = builtin
    if not candidate.is_file():
        raise InputError(f"suite file {candidate} not found", hint="check the path given to --suite")
    try:
        suite: Suite = load_yaml_model(candidate, Suite)  # type: ignore[assignment]
    except ProfileError as error:
        raise InputError(error.message, hint=error.hint) from error

    from llmctl.eval.gates import parse_gate

    for index, expression in enumerate(suite.gates):
        try:
            parse_gate(expression, suite.metric_names())
        except InputError as error:
            raise InputError(f"{candidate}: gates.{index}: {error.message}", hint=error.hint) from None
    return suite, candidate


def default_datasets_dir() -> Path:
    """Return ``$LLMCTL_DATASETS``, or else the ``shared/datasets`` folder beside the repository."""
    configured = os.environ.get(ENV_DATASETS)
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def resolve_data_path(value: str, suite_file: Path) -> tuple[Path, bool]:
    """Expand ``${LLMCTL_DATASETS}`` and resolve a relative path against the suite's folder.

    Returns:
        The path and whether it came from ``${LLMCTL_DATASETS}``: such data is optional, so a
        task whose file is absent there is skipped instead of failing the run.
    """
    optional = DATASETS_VARIABLE in value
    expanded = value.replace(DATASETS_VARIABLE, str(default_datasets_dir()))
    expanded = re.sub(r"\$\{(\w+)\}", lambda match: os.environ.get(match.group(1), match.group(0)), expanded)
    path = Path(expanded).expanduser()
    if not path.is_absolute():
        path = suite_file.parent / path
    return path, optional
