"""Hardware profiles: validated YAML files that describe a target and the recipe that suits it."""

from llmctl.profiles.loader import (
    DEFAULT_PROFILE,
    builtin_profile_dir,
    builtin_profile_names,
    format_validation_error,
    load_profile,
    load_profile_file,
)
from llmctl.profiles.schema import Profile

__all__ = [
    "DEFAULT_PROFILE",
    "Profile",
    "builtin_profile_dir",
    "builtin_profile_names",
    "format_validation_error",
    "load_profile",
    "load_profile_file",
]
