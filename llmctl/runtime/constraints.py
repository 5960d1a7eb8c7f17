"""Constrained decoding: output that always parses as JSON matching a schema, with llguidance.

Before each token, llguidance computes a bitmask of the tokens that keep the output a valid
prefix of the grammar. The sampler sets every other logit to minus infinity. Once the JSON
value is complete, only end-of-sequence tokens remain allowed.

llguidance is used rather than a hand-written JSON state machine because it handles the hard
part: tokens that span several grammar symbols, with byte-level and SentencePiece vocabularies.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.errors import InputError, RuntimeBackendError

if TYPE_CHECKING:
    from llmctl.runtime.tokenizer import ArtifactTokenizer

# NOTE: llguidance's default JSON layout has no whitespace outside strings. Flexible
# whitespace reads more like free text, but can let a small model emit newlines until max_tokens.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class JsonGrammar:
    """A compiler of JSON schemas against one model's tokenizer, and the start of each constrained generation.

    Thread-safe: the llguidance tokenizer is built once, on first use (about 0.3 s for a
    49k-token vocabulary), and only read afterwards.

    Args:
        tokenizer: the model's tokenizer; llguidance reads its tokens as raw bytes.
        vocab_size: the width of the model's logits.
        eos_token_ids: the tokens that end a generation once the JSON value is complete.
    """

    def __init__(self, tokenizer: ArtifactTokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._llg: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        from llguidance import LLTokenizer, TokenizerWrapper

        with self._lock:
            if self._llg is None:
                # NOTE: built from token bytes, not from tokenizer.json: llguidance 1.9 reads the
                # byte-level tokens of GGUF-converted tokenizers (a ByteLevel decoder inside a
                # Sequence) as literal text, so a space would count as "Ġ".
                wrapper = TokenizerWrapper(_LLGuidanceVocabulary(self._tokenizer, self._eos_token_ids))
                self._llg = LLTokenizer(wrapper, n_vocab=self._vocab_size, eos_token=self._eos_token_ids)
            return self._llg

    def compile(self, schema: dict[str, Any]) -> str:
        """Return the llguidance grammar for ``schema``.

        Raises:
            InputError: the schema is not a valid JSON schema, or uses a feature llguidance lacks.
        """
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as error:
            raise InputError(f"invalid JSON schema: {error}", hint="send a JSON schema object") from error
        message = LLMatcher.validate_grammar(grammar, self._llg_tokenizer())
        if message and not message.startswith("WARNING"):
            raise InputError(f"invalid JSON schema: {message}", hint="fix the schema, or use response_format json_object")
        return grammar

    def start(self, grammar: str) -> JsonConstraint:
        """Return the constraint state for one generation under ``grammar``."""
        from llguidance import LLMatcher

        return JsonConstraint(LLMatcher(self._llg_tokenizer(), grammar, log_level=0), self._vocab_size)


class JsonConstraint:
    """The grammar state of one generation: which tokens may come next.

    Args:
        matcher: an ``llguidance.LLMatcher`` for the grammar.
        vocab_size: the width of the logits it masks.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """Return a boolean array over the vocabulary: True where a token may come next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)
        if allowed.size < self._vocab_size:
            # Padded vocabularies: ids past the tokenizer's are never valid text.
            allowed = np.concatenate([allowed, np.zeros(self._vocab_size - allowed.size, dtype=bool)])
        return allowed

    def accept(self, token_id: int) -> None:
        """Advance the grammar past ``token_id``, which ``allowed`` permitted.

        Raises:
            RuntimeBackendError: the grammar rejected the token.
        """
        if not self._matcher.consume_token(int(token_id)):
            raise RuntimeBackendError(
                f"the JSON grammar rejected token {token_id}: {self._matcher.get_error()}",
                hint="retry the request; if it fails again, simplify the schema",
            )


class _LLGuidanceVocabulary:
    """The tokenizer as llguidance's ``TokenizerWrapper`` reads it: token bytes, special ids, an encoder."""

    def __init__(self, tokenizer: ArtifactTokenizer, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = tokenizer.special_token_ids

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("pass text, not bytes")
        return self._tokenizer.encode(text, add_special_tokens=False)


def schema_for(response_format: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    """Return the JSON schema that an OpenAI ``response_format`` requests: any object for ``json_object``."""
    if response_format == "json_object":
        return {"type": "object"}
    if schema is None:
        raise InputError("response_format json_schema has no schema", hint='add "schema": {...} to json_schema')
    return json.loads(json.dumps(schema))
