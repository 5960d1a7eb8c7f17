"""The plugin registries."""

from __future__ import annotations

import pytest

from llmctl.errors import UsageError
from llmctl.registry import Registry


def test_registry_lists_and_creates() -> None:
    registry: Registry = Registry("llmctl.test-group", "widget")
    registry.register("plain", lambda size=1: {"size": size})
    registry.register("by-reference", "collections:OrderedDict")
    assert registry.names() == ["by-reference", "plain"]
    assert registry.create("plain", size=3) == {"size": 3}
    assert registry.create("by-reference") == {}


def test_registry_unknown_name_lists_known() -> None:
    registry: Registry = Registry("llmctl.test-group", "widget")
    registry.register("alpha", dict)
    with pytest.raises(UsageError, match="unknown widget 'beta'") as caught:
        registry.get("beta")
    assert caught.value.hint == "choose one of: alpha"
