"""Reading eval data files: JSONL records, text files, multiple-choice field mappings, sampling."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import InputError

_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")


@dataclass(frozen=True)
class Record:
    """One JSONL record with the place it came from, for error messages."""

    path: Path
    line: int
    data: dict[str, Any]

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def get(self, field: str) -> Any:
        """Return a (dotted) field of the record.

        Raises:
            InputError: the field is missing.
        """
        value: Any = self.data
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise InputError(f"{self.where()}: missing field {field!r}", hint="fix the record or the task's field mapping")
            value = value[part]
        return value


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice question: the context, the choice texts and the gold index."""

    context: str
    choices: list[str]
    gold: int


def read_jsonl(path: Path) -> list[Record]:
    """Read every non-blank line of a JSONL file as an object.

    Raises:
        InputError: the file is missing or unreadable, a line is not a JSON object (the
            message names the file and the line), or the file has no records.
    """
    if not path.is_file():
        raise InputError(f"data file {path} not found", hint="check the task's data path in the suite")
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: invalid JSON: {error.msg}", hint="each line must be one JSON object") from None
                if not isinstance(data, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
                records.append(Record(path, number, data))
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not records:
        raise InputError(f"data file {path} is empty", hint="a task needs at least one record")
    return records


def read_text(path: Path) -> str:
    """Read a UTF-8 text file.

    Raises:
        InputError: the file is missing, not UTF-8, or has no text.
    """
    if not path.is_file():
        raise InputError(f"data file {path} not found", hint="check the task's data path in the suite")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise InputError(f"data file {path} is empty", hint="a perplexity task needs text to score")
    return text


def read_labels(path: Path, count: int) -> list[int]:
    """Read one integer label per line (PIQA's ``valid-labels.lst``), aligned with the records.

    Raises:
        InputError: missing file, a line that is not an integer, or a count that does not match.
    """
    if not path.is_file():
        raise InputError(f"labels file {path} not found", hint="check the task's labels path in the suite")
    labels = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            labels.append(int(line.strip()))
        except ValueError:
            raise InputError(f"{path}:{number}: expected an integer label, got {line.strip()!r}") from None
    if len(labels) != count:
        raise InputError(f"{path}: {len(labels)} labels for {count} records", hint="the labels file must have one line per record")
    return labels


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """Pick ``limit`` of ``total`` indices with ``seed``, in ascending order; all when no limit."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def render_template(template: str, record: Record) -> str:
    """Replace each ``{field}`` in ``template`` with the record's value."""
    return _FIELD.sub(lambda match: str(record.get(match.group(1))), template)


# --- built-in field mappings, with the prompt formats lm-evaluation-harness uses -------------


def _hellaswag_clean(text: str) -> str:
    # The same clean-up lm-evaluation-harness applies to HellaSwag text; the shared copy is
    # already cleaned, so on it this only strips surrounding spaces.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: Record) -> ChoiceExample:
    endings = record.get("endings")
    if not isinstance(endings, list) or not endings:
        raise InputError(f"{record.where()}: field 'endings' must be a non-empty list")
    return ChoiceExample(_hellaswag_clean(str(record.get("ctx"))), [_hellaswag_clean(str(e)) for e in endings], _index(record, "label", len(endings)))


def _arc(record: Record) -> ChoiceExample:
    choices = record.get("question.choices")
    if not isinstance(choices, list) or not choices:
        raise InputError(f"{record.where()}: field 'question.choices' must be a non-empty list")
    labels = [str(choice.get("label")) for choice in choices]
    key = str(record.get("answerKey"))
    if key not in labels:
        raise InputError(f"{record.where()}: answerKey {key!r} is not one of the choice labels {labels}")
    context = f"Question: {record.get('question.stem')}\nAnswer:"
    return ChoiceExample(context, [str(choice.get("text")) for choice in choices], labels.index(key))


def _piqa(record: Record) -> ChoiceExample:
    context = f"Question: {record.get('goal')}\nAnswer:"
    return ChoiceExample(context, [str(record.get("sol1")), str(record.get("sol2"))], _index(record, "label", 2))


def _boolq(record: Record) -> ChoiceExample:
    answer = record.get("answer")
    if isinstance(answer, str) and answer.lower() in {"true", "false"}:
        gold = int(answer.lower() == "true")
    elif isinstance(answer, bool):
        gold = int(answer)
    else:
        raise InputError(f"{record.where()}: field 'answer' must be true or false, got {answer!r}")
    context = f"{record.get('passage')}\nQuestion: {record.get('question')}?\nAnswer:"
    return ChoiceExample(context, ["no", "yes"], gold)


BUILTIN_FORMATS = {"hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa, "boolq": _boolq}


def _index(record: Record, field: str, count: int) -> int:
    value = record.get(field)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise InputError(f"{record.where()}: field {field!r} must be a choice index from 0 to {count - 1}, got {value!r}")
    return value


def custom_example(record: Record, context: str, choices_spec: str | list[str], label: str) -> ChoiceExample:
    """Read a record through a declared mapping (see ``ChoiceMapping``)."""
    if isinstance(choices_spec, list):
        choices = [str(record.get(field)) for field in choices_spec]
    else:
        value = record.get(choices_spec)
        if not isinstance(value, list) or not value:
            raise InputError(f"{record.where()}: field {choices_spec!r} must be a non-empty list of choices")
        choices = [str(choice) for choice in value]

    gold_value = record.get(label)
    if isinstance(gold_value, str) and gold_value in choices:
        gold = choices.index(gold_value)
    elif isinstance(gold_value, str) and len(gold_value) == 1 and gold_value.isalpha():
        gold = ord(gold_value.upper()) - ord("A")
    else:
        gold = _index(record, label, len(choices))
    if not 0 <= gold < len(choices):
        raise InputError(f"{record.where()}: label {gold_value!r} does not name one of {len(choices)} choices")
    return ChoiceExample(render_template(context, record), choices, gold)
