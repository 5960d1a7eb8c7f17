"""Parts shared by the built-in backends: tokenizer plumbing and a generation loop over logits."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.errors import InputError
from llmctl.runtime.base import Backend, GenerationStep, SamplingParams, TokenLogprob
from llmctl.runtime.batching import BatchEngine, TurnLock
from llmctl.runtime.constraints import JsonGrammar
from llmctl.runtime.sampling import Sampler, log_softmax, top_entries
from llmctl.runtime.tokenizer import ArtifactTokenizer, eos_ids_from_folder, read_json

if TYPE_CHECKING:
    from llmctl.runtime.ort import OnnxDecoder


class TokenizerBackend(Backend):
    """A backend that tokenizes with the artifact's Hugging Face tokenizer."""

    tokenizer: ArtifactTokenizer
    _eos_ids: list[int]
    _context_length: int
    _json_grammar: JsonGrammar | None = None
    _engine: BatchEngine | None = None

    def _load_tokenizer(self) -> None:
        self.tokenizer = ArtifactTokenizer(self.model_path)
        self._eos_ids = eos_ids_from_folder(self.model_path, self.tokenizer)
        config = read_json(self.model_path / "config.json")
        genai = read_json(self.model_path / "genai_config.json").get("model", {})
        self._context_length = int(config.get("max_position_embeddings") or genai.get("context_length") or 2048)
        self._vocab_size = int(config.get("vocab_size") or genai.get("vocab_size") or len(self.tokenizer))

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits; may exceed the tokenizer's length when padded."""
        return self._vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_bytes(self, token_id: int) -> bytes | None:
        table = self.tokenizer.token_bytes()
        return table[token_id] if 0 <= token_id < len(table) else None

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def check_json_schema(self, schema: dict[str, Any]) -> None:
        """Check that generation can be constrained to ``schema``.

        Raises:
            InputError: the schema is invalid or uses a feature the grammar engine lacks.
        """
        self._grammar().compile(schema)

    def make_sampler(self, params: SamplingParams) -> Sampler:
        """Return the sampler for one generation, constrained to ``params.json_schema`` when set."""
        constraint = None
        if params.json_schema is not None:
            grammar = self._grammar()
            constraint = grammar.start(grammar.compile(params.json_schema))
        return Sampler(params, self.vocab_size, self._eos_ids, constraint)

    def _start_batching(self, decoder: OnnxDecoder, step_lock: TurnLock) -> None:
        """Run every later generation through a ``BatchEngine`` over ``decoder``."""
        self._engine = BatchEngine(decoder, context_length=self.context_length, step_lock=step_lock)
        self.capabilities = replace(self.capabilities, continuous_batching=True)

    def _generate_batched(self, ids: list[int], budget: int, params: SamplingParams) -> Iterator[GenerationStep]:
        assert self._engine is not None
        return self._engine.generate(ids, budget, self.make_sampler(params), self._eos_ids, ignore_eos=params.ignore_eos)

    def _stop_batching(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def _grammar(self) -> JsonGrammar:
        if self._json_grammar is None:
            self._json_grammar = JsonGrammar(self.tokenizer, self.vocab_size, self._eos_ids)
        return self._json_grammar

    def _prepare_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], int]:
        """Check the prompt against the context and return it with the number of tokens to generate.

        An empty prompt starts from the BOS token, since a decoder needs one token to predict from.

        Raises:
            InputError: the prompt is empty and the model has no BOS token, or it fills the context.
        """
        ids = [int(t) for t in prompt_ids]
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise InputError("the prompt is empty and the model has no BOS token to start from", hint="send a non-empty prompt")
            ids = [int(bos)]
        if len(ids) >= self.context_length:
            raise InputError(
                f"the prompt has {len(ids)} tokens but the context length is {self.context_length}",
                hint="shorten the prompt",
            )
        return ids, max(0, min(params.max_tokens, self.context_length - len(ids)))


class ScoringBackend(TokenizerBackend):
    """A backend that scores sequences from full logits computed in one forward pass."""

    @abc.abstractmethod
    def _batch_logits(self, sequences: list[list[int]]) -> np.ndarray:
        """Return ``(batch, max_len, vocab)`` logits for right-padded sequences (no cache)."""

    def next_token_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise InputError("cannot compute logits of an empty sequence", hint="pass at least one token id")
        return self._batch_logits([ids])[0, : len(ids), : self.vocab_size].astype(np.float32)

    def score(self, token_ids: Sequence[int], *, top_logprobs: int = 0) -> list[TokenLogprob | None]:
        return self.score_batch([token_ids], top_logprobs=top_logprobs)[0]

    def score_batch(self, sequences: Sequence[Sequence[int]], *, top_logprobs: int = 0) -> list[list[TokenLogprob | None]]:
        batch = [[int(t) for t in sequence] for sequence in sequences]
        results: list[list[TokenLogprob | None]] = [[None] if seq else [] for seq in batch]
        scorable = [i for i, seq in enumerate(batch) if len(seq) > 1]
        if not scorable:
            return results
        too_long = [len(batch[i]) for i in scorable if len(batch[i]) > self.context_length]
        if too_long:
            raise InputError(
                f"a sequence has {max(too_long)} tokens but the context length is {self.context_length}",
                hint="score shorter sequences",
            )

        logits = self._batch_logits([batch[i] for i in scorable])
        for row, index in enumerate(scorable):
            sequence = batch[index]
            distributions = log_softmax(logits[row, : len(sequence) - 1, : self.vocab_size])
            for position, token in enumerate(sequence[1:]):
                distribution = distributions[position]
                results[index].append(
                    TokenLogprob(token, float(distribution[token]), top_entries(distribution, top_logprobs))
                )
        return results


class LogitsBackend(ScoringBackend):
    """A backend whose runtime returns logits; sampling happens in numpy.

    Subclasses provide the model calls; generation state stays local to each call, so
    concurrent generations share nothing mutable.
    """

    @abc.abstractmethod
    def _prefill(self, token_ids: list[int]) -> tuple[np.ndarray, Any]:
        """Run the prompt; return the last position's logits and the KV cache."""

    @abc.abstractmethod
    def _decode_step(self, token_id: int, position: int, cache: Any) -> tuple[np.ndarray, Any]:
        """Run one token at ``position``; return its logits and the grown KV cache."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[GenerationStep]:
        # Checked here, not in the generator body, so a bad prompt raises at the call.
        ids, budget = self._prepare_prompt(prompt_ids, params)
        return self._generate_tokens(ids, budget, params)

    def _generate_tokens(self, ids: list[int], budget: int, params: SamplingParams) -> Iterator[GenerationStep]:
        sampler = self.make_sampler(params)
        eos = set(self._eos_ids)
        if budget == 0:
            return

        logits, cache = self._prefill(ids)
        position = len(ids)
        for generated in range(1, budget + 1):
            token, logprob = sampler.step(logits)
            finish = None
            if token in eos and not params.ignore_eos:
                finish = "stop"
            elif generated == budget:
                finish = "length"
            yield GenerationStep(token, logprob, finish)
            if finish:
                return
            logits, cache = self._decode_step(token, position, cache)
            position += 1
