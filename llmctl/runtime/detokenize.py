"""Turn a token stream into text deltas, and cut the text at stop strings.

Decoding token by token breaks in two ways: a character whose UTF-8 bytes span several
byte-level tokens decodes to U+FFFD until its last byte arrives, and SentencePiece and some
byte-level decoders drop the leading space of the first token of a decoded sequence. The
incremental detokenizer here avoids both by decoding a short window that starts a few tokens
back and emitting only the text past what that window already produced, the method used by
Hugging Face Text Generation Inference and vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHARACTER = "\ufffd"
# Tokens of context kept before the first generated one, so its leading space survives.
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decode tokens one at a time into text deltas whose concatenation equals the full decode.

    Args:
        decode: turns a list of token ids into text (special tokens skipped).
        prompt_ids: the prompt; its last tokens give the first generated token its context.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token and return the text it completes, possibly empty."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])

        # An incomplete multi-byte character decodes to U+FFFD: wait for its remaining bytes.
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        # NOTE: the delta is taken by length. A decoder that rewrites earlier text (clean-up
        # rules) would make the stream differ from a full decode, so the tokenizer wrapper
        # decodes without clean-up.
        delta = full_text[len(prefix_text) :]
        self._advance()
        return delta

    def flush(self) -> str:
        """Return the text still held back (an incomplete character at the end of the stream)."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._advance()
        return full_text[len(prefix_text) :]

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids that no later window can reach, so a long stream keeps a short list.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopStringMatcher:
    """Cut streamed text at the first stop string, holding back text that may start one.

    Text is released only once it can no longer be part of a stop string, so a stop string
    never reaches the output, whether it arrives in one piece, spans several tokens or ends
    inside a token.

    Args:
        stop: the stop strings; empty strings are ignored.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add text and return the part that is safe to emit.

        After a stop string is found, ``stopped`` is True, ``matched`` names it, and every
        later call returns "".
        """
        if self.stopped:
            return ""
        if not self.stop:
            return text

        buffer = self._held + text
        found = [(buffer.find(s), s) for s in self.stop]
        found = [(index, s) for index, s in found if index >= 0]
        if found:
            index, matched = min(found)
            self.stopped = True
            self.matched = matched
            self._held = ""
            return buffer[:index]

        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """Return the held-back text at the end of a stream that met no stop string."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
