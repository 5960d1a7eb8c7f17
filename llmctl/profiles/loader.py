"""Finding and loading profiles: built-in names and user files."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from llmctl.errors import ProfileError
from llmctl.profiles.schema import Profile

DEFAULT_PROFILE = "cpu-x86-avx2"
ENV_PROFILE = "LLMCTL_PROFILE"


def builtin_profile_dir() -> Path:
    """Return the folder of the built-in profiles.

    A wheel carries them inside the package (``llmctl/_builtin_profiles``); a source
    checkout or an editable install reads the repository's ``profiles/`` folder.
    """
    packaged = Path(__file__).resolve().parent.parent / "_builtin_profiles"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "profiles"


def builtin_profile_names() -> list[str]:
    """Return the names of the built-in profiles, sorted."""
    return sorted(p.stem for p in builtin_profile_dir().glob("*.yaml"))


def format_validation_error(source: str, error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """Render a pydantic error as ``source: field.path: message`` lines, one per problem.

    Args:
        source: the file name to start each line with.
        error: the validation error.
        model: the model that was validated; with it, an unknown key gets a "did you mean"
            suggestion among the keys allowed at its place.
    """
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key" + _suggest_key(model, problem["loc"])
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {location}: {message}")
    return "\n".join(lines)


def _suggest_key(model: type[BaseModel] | None, location: tuple[Any, ...]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest allowed key, or a generic remark."""
    import difflib

    parent = _model_at(model, location[:-1]) if model is not None and location else None
    if parent is None:
        return " (check its spelling)"
    allowed = list(parent.model_fields)
    matches = difflib.get_close_matches(str(location[-1]), allowed, n=1, cutoff=0.6)
    if matches:
        return f"; did you mean {matches[0]!r}?"
    return f"; allowed keys: {', '.join(allowed)}"


def _model_at(model: Any, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through field types to the model found there."""
    current = model
    for part in path:
        current = _unwrap(current)
        origin = get_origin(current)
        if origin is list and isinstance(part, int):
            current = get_args(current)[0]
        elif origin is dict:
            current = get_args(current)[1]
        elif isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` from a field annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_error_message(path: Path, error: yaml.YAMLError) -> str:
    """Return ``file:line:column: not valid YAML: problem`` on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return f"{path}: not valid YAML: " + " ".join(str(error).split())
    problem = problem.replace("'<stream end>'", "the end of the file")
    message = f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        message += f" ({context} on line {context_mark.line + 1})"
    return message


_TYPE_NAMES = {"list": "a list", "str": "a string", "int": "a number", "float": "a number", "bool": "true or false"}


def load_yaml_model(path: Path, model: type[BaseModel]) -> BaseModel:
    """Load a YAML file safely into ``model``.

    Raises:
        ProfileError: the file is missing, a folder, empty, not UTF-8, not YAML (or gives a
            key twice), or does not validate; the message has one ``file: field: message``
            line per problem.
    """
    if path.is_dir():
        raise ProfileError(f"{path}: is a folder, expected a YAML file", hint=f"pass the YAML files in it: {path}/*.yaml")
    if not path.is_file():
        raise ProfileError(f"{path}: file not found", hint="check the path")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as error:
        raise ProfileError(f"{path}: not valid UTF-8 at byte {error.start}", hint="save the file as UTF-8") from error
    except yaml.YAMLError as error:
        raise ProfileError(_yaml_error_message(path, error)) from error
    if data is None:
        raise ProfileError(f"{path}: empty file, expected a mapping of keys",
                           hint="llmctl profiles show cpu-x86-avx2 prints a complete profile")
    if not isinstance(data, dict):
        kind = _TYPE_NAMES.get(type(data).__name__, type(data).__name__)
        raise ProfileError(f"{path}: (top level): expected a mapping of keys, got {kind}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ProfileError(format_validation_error(str(path), error, model)) from error


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file."""
    return load_yaml_model(path, Profile)  # type: ignore[return-value]


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    """Load a built-in profile by name, or a profile file by path.

    Args:
        name_or_path: a built-in name such as ``cpu-x86-avx2``, a path to a YAML file, or
            None for ``$LLMCTL_PROFILE`` or else the default profile.

    Raises:
        ProfileError: no built-in of that name and no such file, or the profile is invalid.
    """
    import os

    from_environment = name_or_path is None and bool(os.environ.get(ENV_PROFILE))
    try:
        return _load_named_profile(name_or_path if name_or_path is not None else os.environ.get(ENV_PROFILE) or DEFAULT_PROFILE)
    except ProfileError as error:
        if from_environment:
            error.message = f"{error.message} (from ${ENV_PROFILE})"
            error.hint = f"fix or unset ${ENV_PROFILE}" + (f"; {error.hint}" if error.hint else "")
        raise


def _load_named_profile(name_or_path: str | Path) -> Profile:
    import os

    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix in {".yaml", ".yml"} or os.sep in text or candidate.is_file():
        return load_profile_file(candidate)

    builtin = builtin_profile_dir() / f"{text}.yaml"
    if builtin.is_file():
        return load_profile_file(builtin)
    known = ", ".join(builtin_profile_names())
    raise ProfileError(
        f"unknown profile {text!r}",
        hint=f"built-in profiles: {known}; or pass a path to a YAML file",
    )
