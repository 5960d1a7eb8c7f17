"""The Hugging Face tokenizer of an artifact, shared by every backend.

All backends tokenize with the same ``tokenizer.json`` so that a prompt gives the same ids
whichever runtime runs it, which is what makes their outputs comparable token for token.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from functools import cache
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmctl.errors import RuntimeBackendError, UsageError

logger = logging.getLogger(__name__)


# The special-token names of tokenizer_config.json that chat templates read as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ArtifactTokenizer:
    """Encode, decode and apply the chat template with the tokenizer stored in a model folder.

    A folder with ``tokenizer.json`` is read with ``tokenizers`` and ``jinja2`` alone, which
    keeps transformers (about 300 MB resident, measured with SmolLM2) out of the server.
    Other folders go through transformers' ``AutoTokenizer``, which converts slow tokenizers.

    Thread-safe: the ``tokenizers`` objects and the template are only read after construction.

    Args:
        folder: a folder with ``tokenizer.json`` (or files ``AutoTokenizer`` can convert).

    Raises:
        RuntimeBackendError: no tokenizer could be loaded from ``folder``.
    """

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        config = read_json(self.folder / "tokenizer_config.json")
        if (self.folder / "tokenizer.json").is_file():
            try:
                self._parsing = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            except Exception as error:  # tokenizers raises a bare Exception for a malformed file
                raise RuntimeBackendError(
                    f"failed to read {self.folder / 'tokenizer.json'}: {error}", hint="re-run llmctl convert"
                ) from error
            self._special_map = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES if config.get(name)}
            template = _read_chat_template(self.folder, config)
        else:
            self._parsing, self._special_map, template = _from_transformers(self.folder)
        self.chat_template: str | None = template
        # A second copy that treats special-token text as plain text, for user content.
        self._plain = Tokenizer.from_str(self._parsing.to_str())
        self._plain.encode_special_tokens = True
        self.special_tokens = sorted(
            {token.content for token in self._parsing.get_added_tokens_decoder().values() if token.special},
            key=len,
            reverse=True,
        )
        self._template: Any = None
        self._token_bytes: list[bytes] | None = None
        self._bytes_lock = threading.Lock()

    def __len__(self) -> int:
        return self._parsing.get_vocab_size(with_added_tokens=True)

    def token_bytes(self) -> list[bytes]:
        """Return the raw bytes of every token id, in id order (computed once).

        Byte-level vocabularies store each byte as a printable character (GPT-2's table).
        SentencePiece vocabularies store spaces as U+2581 and unknown bytes as ``<0xNN>``.
        This undoes both, and added tokens give their text. Decoding one token at a time
        cannot serve, because a token that contains part of a multi-byte character decodes to U+FFFD.
        """
        with self._bytes_lock:
            if self._token_bytes is None:
                self._token_bytes = self._build_token_bytes()
            return self._token_bytes

    def _build_token_bytes(self) -> list[bytes]:
        size = len(self)
        table = [b""] * size
        byte_level = "ByteLevel" in json.dumps(json.loads(self._parsing.to_str()).get("pre_tokenizer"))
        characters = {character: byte for byte, character in _byte_level_characters().items()}
        for text, token_id in self._parsing.get_vocab(with_added_tokens=False).items():
            if token_id >= size:
                continue
            if byte_level and all(character in characters for character in text):
                table[token_id] = bytes(characters[character] for character in text)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                table[token_id] = bytes([int(text[3:5], 16)])
            else:
                table[token_id] = text.replace("\u2581", " ").encode("utf-8")
        for token_id, token in self._parsing.get_added_tokens_decoder().items():
            if token_id < size:
                table[token_id] = token.content.encode("utf-8")
        return table

    @property
    def special_token_ids(self) -> list[int]:
        return sorted(token_id for token_id, token in self._parsing.get_added_tokens_decoder().items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        """Return the id of ``token``'s text, or None when the vocabulary lacks it."""
        return self._parsing.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        text = self._special_map.get(name)
        return self.token_to_id(text) if text else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

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
                f"the model in {self.folder} has no chat template",
                hint="send a plain prompt instead of chat messages",
            )
        messages = [_check_message(message, index) for index, message in enumerate(messages)]
        if not any(self._contains_special_text(m.get("content")) for m in messages):
            return self._parsing.encode(self._render(messages, add_generation_prompt), add_special_tokens=False).ids
        return self._encode_with_markers(messages, add_generation_prompt)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            template = self._compiled_template()
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self._special_map
            )
        except Exception as error:  # jinja2 raises TemplateError and also plain exceptions from raise_exception()
            raise UsageError(f"the chat template rejected the messages: {error}", hint="check the roles and their order") from error

    def _compiled_template(self) -> Any:
        """Compile the chat template once, in the environment transformers renders it in."""
        if self._template is None:
            self._template = compile_chat_template(str(self.chat_template))
        return self._template

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


def compile_chat_template(source: str) -> Any:
    """Compile a chat template the way transformers' ``apply_chat_template`` does.

    A sandbox, ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` filter that
    keeps non-ASCII text, and the ``raise_exception`` and ``strftime_now`` globals.
    """
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # NOTE: transformers also defines a {% generation %} tag for assistant-token masks; a
    # template that uses it fails to compile here and the chat request gets a 400.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)


@cache
def _byte_level_characters() -> dict[int, str]:
    """Return GPT-2's table from each byte to the printable character that stands for it in
    byte-level vocabularies: printable Latin-1 bytes stand for themselves, the others map to
    U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _token_text(value: Any) -> str:
    """Return a special token's text from tokenizer_config.json, where it is a string or an object."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value)


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """Return the chat template: ``chat_template.jinja`` first, as transformers reads it, then the config's."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one named "default" is the chat template.
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _from_transformers(folder: Path) -> tuple[Any, dict[str, str], str | None]:
    """Load a folder without ``tokenizer.json`` through ``AutoTokenizer``; return its fast tokenizer,
    special tokens and chat template."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise RuntimeBackendError(
            f"cannot load the tokenizer in {folder}: {error}",
            hint="the folder needs tokenizer.json and tokenizer_config.json",
        ) from error
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise RuntimeBackendError(
            f"the tokenizer in {folder} has no fast (tokenizers) version",
            hint="save it with a tokenizer.json next to the model",
        )
    special = {name: str(value) for name, value in hf.special_tokens_map.items() if name in SPECIAL_TOKEN_NAMES}
    template = getattr(hf, "chat_template", None)
    return backend, special, template if isinstance(template, str) else None


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
