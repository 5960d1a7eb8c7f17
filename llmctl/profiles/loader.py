"""Finding and loading profiles: built-in names and user files."""

from __future__ import annotations

from pathlib import Path

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


def format_validation_error(source: str, error: ValidationError) -> str:
    """Render a pydantic error as ``source: field.path: message`` lines, one per problem."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check its spelling)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {location}: {message}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[BaseModel]) -> BaseModel:
    """Load a YAML file safely into ``model``.

    Raises:
        ProfileError: the file is missing, is not YAML, or does not validate; the message
            has one ``file: field: message`` line per problem.
    """
    if not path.is_file():
        raise ProfileError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ProfileError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from error
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ProfileError(format_validation_error(str(path), error)) from error


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
