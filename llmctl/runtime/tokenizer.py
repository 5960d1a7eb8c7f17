"""The Hugging Face tokenizer of an artifact, shared by every backend.

All backends tokenize with the same ``tokenizer.json`` so that a prompt gives the same ids
whichever runtime runs it, which is what makes their outputs comparable token for token.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmctl.errors import RuntimeBackendError, UsageError

logger = logging.getLogger(__name__)


class ArtifactTokenizer:
    """Encode, decode and apply the chat template with the tokenizer stored in a model folder.

    Thread-safe: the ``tokenizers`` objects are only read after construction.

    Args:
        folder: a folder with ``tokenizer.json`` (or files ``AutoTokenizer`` can convert).

    Raises:
        RuntimeBackendError: no tokenizer could be loaded from ``folder``.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as error:
            raise RuntimeBackendError(
                f"cannot load the tokenizer in {folder}: {error}",
                hint="the folder needs tokenizer.json and tokenizer_config.json",
            ) from error
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise RuntimeBackendError(
                f"the tokenizer in {folder} has no fast (tokenizers) version",
                hint="save it with a tokenizer.json next to the model",
            )
        self._parsing = backend
        # A second copy that treats special-token text as plain text, for user content.
        self._plain = Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.special_tokens = sorted(
            {token.content for token in self.hf.added_tokens_decoder.values() if token.special}, key=len, reverse=True
        )

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Tokenize ``text``; special-token text in it stays plain text."""
        return self._plain.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Decode ids without clean-up, so streamed deltas concatenate to the same text."""
        return self._parsing.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Render ``messages`` through the chat template and tokenize the result.

        The template's markup becomes control tokens; special-token text that a message
        carries in its content does not. Content is rendered in place of a unique marker,
        and the text between markers is tokenized with special tokens parsed while the
        content itself is tokenized as plain text.

        Raises:
            UsageError: the tokenizer has no chat template, or a message is malformed.
        """
        if not self.has_chat_template:
            raise UsageError(
                f"the model in {self.hf.name_or_path} has no chat template",
                hint="send a plain prompt instead of chat messages",
            )
        messages = [_check_message(message, index) for index, message in enumerate(messages)]
        if not any(self._contains_special_text(m.get("content")) for m in messages):
            return self._parsing.encode(self._render(messages, add_generation_prompt), add_special_tokens=False).ids
        return self._encode_with_markers(messages, add_generation_prompt)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja2 raises TemplateError and also plain exceptions from raise_exception()
            raise UsageError(f"the chat template rejected the messages: {error}", hint="check the roles and their order") from error

    def _contains_special_text(self, content: Any) -> bool:
        return isinstance(content, str) and any(token in content for token in self.special_tokens)

    def _encode_with_markers(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        tag = uuid.uuid4().hex
        contents: dict[str, str] = {}
        marked = []
        for index, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str):
                marker = f"[[{tag}:{index}]]"
                contents[marker] = content
                message = {**message, "content": marker}
            marked.append(message)
        rendered = self._render(marked, add_generation_prompt)

        pattern = re.compile(r"\[\[" + tag + r":\d+\]\]")
        found = pattern.findall(rendered)
        if sorted(found) != sorted(contents):
            # NOTE: a template that transforms or repeats the content defeats the markers;
            # render normally then and parse special-token text in it, as transformers does.
            logger.warning("chat template changes message content; special-token text in content will be parsed")
            return self._parsing.encode(self._render(messages, add_generation_prompt), add_special_tokens=False).ids

        ids: list[int] = []
        position = 0
        for match in pattern.finditer(rendered):
            ids += self._parsing.encode(rendered[position : match.start()], add_special_tokens=False).ids
            ids += self._plain.encode(contents[match.group(0)], add_special_tokens=False).ids
            position = match.end()
        ids += self._parsing.encode(rendered[position:], add_special_tokens=False).ids
        return ids


def _check_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict) or "role" not in message:
        raise UsageError(f"message {index} is not an object with a 'role'", hint='use {"role": ..., "content": ...}')
    content = message.get("content")
    if isinstance(content, list):
        # Arrays of text parts, as the OpenAI API allows, become one string.
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        message = {**message, "content": "".join(texts)}
    return message


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file into a dict; a missing file gives an empty dict."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def eos_ids_from_folder(folder: Path, tokenizer: ArtifactTokenizer) -> list[int]:
    """Collect the end-of-sequence ids from generation_config.json, config.json and the tokenizer."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = read_json(folder / name).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)
