"""Parity between two models of the same network: PyTorch against ONNX, or ONNX against ONNX.

``compare`` runs a reference and a candidate on the same token sequences and measures how far
the candidate drifted: the max absolute logit difference, top-1 agreement and mean KL
divergence on teacher-forced sequences, and greedy-token agreement when the candidate decodes
on its own with its KV cache. The ONNX runner drives an ``onnxruntime.InferenceSession``
directly, so it works on the optimum export's and the GenAI builder's graphs alike and needs
no runtime backend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmctl.errors import ConversionError

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
)
CHAT_PROMPT = "What is the capital of France?"
PAST_INPUT_PREFIX = "past_key_values."
PRESENT_OUTPUT_PREFIX = "present."


class CausalLM(Protocol):
    """Model interface that parity needs: full-sequence logits and greedy decoding with a cache."""

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Return fp32 logits of shape [len(token_ids), vocab] for one sequence."""

    def greedy(self, token_ids: list[int], new_tokens: int) -> list[int]:
        """Decode ``new_tokens`` tokens greedily after ``token_ids``, ignoring end-of-sequence."""


class TorchCausalLM:
    """A Hugging Face checkpoint run by PyTorch in fp32: the reference of a conversion."""

    def __init__(self, folder: Path, *, threads: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()

    def logits(self, token_ids: list[int]) -> np.ndarray:
        with self._torch.inference_mode():
            output = self.model(self._torch.tensor([token_ids]), use_cache=False)
        return output.logits[0].float().numpy()

    def greedy(self, token_ids: list[int], new_tokens: int) -> list[int]:
        torch = self._torch
        generated: list[int] = []
        with torch.inference_mode():
            output = self.model(torch.tensor([token_ids]), use_cache=True)
            for _ in range(new_tokens):
                next_id = int(output.logits[0, -1].argmax())
                generated.append(next_id)
                output = self.model(torch.tensor([[next_id]]), past_key_values=output.past_key_values, use_cache=True)
        return generated


class OnnxCausalLM:
    """A decoder ONNX graph with KV cache run through an ``onnxruntime.InferenceSession``.

    Handles both input layouts in use: the GenAI builder's (``input_ids``, ``attention_mask``,
    ``past_key_values.N.key/value``; positions come from the mask) and optimum's (the same
    plus ``position_ids``). Present outputs ``present.N.key/value`` feed the next step's past.
    """

    def __init__(self, model_path: Path, *, threads: int = 0, provider: str = "cpu") -> None:
        import onnxruntime as ort

        from llmctl.pipeline.preflight import PROVIDER_NAMES

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = list(dict.fromkeys([PROVIDER_NAMES[provider], "CPUExecutionProvider"]))
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ConversionError(f"{model_path}: onnxruntime cannot load the model: {str(error).splitlines()[0]}") from error
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [name for name in self.inputs if name.startswith(PAST_INPUT_PREFIX)]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise ConversionError(f"{model_path}: not a causal language model graph (needs input_ids and logits)")

    def _empty_past(self) -> dict[str, np.ndarray]:
        past = {}
        for name in self.past_names:
            meta = self.inputs[name]
            dtype = np.float16 if "float16" in meta.type else np.float32
            # Layout [batch, kv_heads, past_length, head_size]; the two middle sizes are fixed ints.
            dims = [d if isinstance(d, int) else 0 for d in meta.shape]
            dims[0] = 1
            dims[2] = 0
            past[name] = np.zeros(dims, dtype=dtype)
        return past

    def _run(self, chunk: list[int], past: dict[str, np.ndarray], past_length: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = past_length + len(chunk)
        feed: dict[str, Any] = {"input_ids": np.array([chunk], dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_length, total, dtype=np.int64)[None, :]
        feed.update(past)
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))

        next_past = {}
        for name in self.past_names:
            present = PRESENT_OUTPUT_PREFIX + name[len(PAST_INPUT_PREFIX):]
            next_past[name] = outputs[present]
        return outputs["logits"][0].astype(np.float32), next_past

    def logits(self, token_ids: list[int]) -> np.ndarray:
        logits, _ = self._run(token_ids, self._empty_past(), 0)
        return logits

    def greedy(self, token_ids: list[int], new_tokens: int) -> list[int]:
        logits, past = self._run(token_ids, self._empty_past(), 0)
        length = len(token_ids)
        generated: list[int] = []
        for _ in range(new_tokens):
            next_id = int(logits[-1].argmax())
            generated.append(next_id)
            logits, past = self._run([next_id], past, length)
            length += 1
        return generated


@dataclass
class ParityReport:
    """How far a candidate model's outputs are from the reference's.

    Attributes:
        max_abs_logit_diff: max over all compared positions and vocabulary entries.
        top1_agreement: share of positions whose argmax token is the same.
        mean_kl_divergence: mean KL(reference || candidate) of the next-token distributions.
        greedy_agreement: share of greedily decoded tokens equal to the reference's, position by position.
        greedy_prefix_tokens: per prompt, how many leading greedy tokens match before the first difference.
    """

    max_abs_logit_diff: float
    top1_agreement: float
    mean_kl_divergence: float
    greedy_agreement: float
    greedy_prefix_tokens: list[int]
    positions: int
    new_tokens: int
    prompts: int
    reference: str = ""
    candidate: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(
    reference: CausalLM,
    candidate: CausalLM,
    prompts: list[list[int]],
    *,
    new_tokens: int = 32,
    tolerance: Any = None,
    reference_name: str = "",
    candidate_name: str = "",
) -> ParityReport:
    """Measure the drift of ``candidate`` from ``reference`` on tokenized prompts.

    Each prompt is extended with ``new_tokens`` tokens decoded greedily by the reference. Both
    models then score that whole sequence (teacher forcing) for the logit difference, top-1
    agreement and KL divergence, and the candidate decodes the same number of tokens on its
    own, through its KV cache, for greedy agreement.

    Args:
        reference: the model taken as correct.
        candidate: the converted or quantized model.
        prompts: token id lists, one per prompt.
        new_tokens: tokens to decode greedily after each prompt.
        tolerance: an optional ``llmctl.profiles.schema.Tolerance``; breaches go to ``failures``.
        reference_name: a label for the report.
        candidate_name: a label for the report.

    Returns:
        The parity report.
    """
    max_diff = 0.0
    top1_hits = 0
    kl_total = 0.0
    positions = 0
    greedy_hits = 0
    prefixes = []

    for prompt in prompts:
        expected = reference.greedy(prompt, new_tokens)
        sequence = prompt + expected
        reference_logits = reference.logits(sequence)
        candidate_logits = candidate.logits(sequence)
        vocab = min(reference_logits.shape[-1], candidate_logits.shape[-1])
        reference_logits = reference_logits[:, :vocab]
        candidate_logits = candidate_logits[:, :vocab]

        max_diff = max(max_diff, float(np.abs(reference_logits - candidate_logits).max()))
        top1_hits += int((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).sum())
        reference_logp = _log_softmax(reference_logits.astype(np.float64))
        candidate_logp = _log_softmax(candidate_logits.astype(np.float64))
        kl_total += float((np.exp(reference_logp) * (reference_logp - candidate_logp)).sum())
        positions += len(sequence)

        decoded = candidate.greedy(prompt, new_tokens)
        greedy_hits += sum(a == b for a, b in zip(decoded, expected))
        prefix = next((i for i, (a, b) in enumerate(zip(decoded, expected)) if a != b), new_tokens)
        prefixes.append(prefix)

    total_new = max(1, new_tokens * len(prompts))
    report = ParityReport(
        max_abs_logit_diff=max_diff if math.isfinite(max_diff) else float("inf"),
        top1_agreement=top1_hits / max(1, positions),
        mean_kl_divergence=kl_total / max(1, positions),
        greedy_agreement=greedy_hits / total_new,
        greedy_prefix_tokens=prefixes,
        positions=positions,
        new_tokens=new_tokens,
        prompts=len(prompts),
        reference=reference_name,
        candidate=candidate_name,
    )
    if tolerance is not None:
        report.failures = check_tolerance(report, tolerance)
    return report


def check_tolerance(report: ParityReport, tolerance: Any) -> list[str]:
    """Return one message per limit of ``tolerance`` that ``report`` breaches."""
    failures = []
    if tolerance.max_abs_logit_diff is not None and not report.max_abs_logit_diff <= tolerance.max_abs_logit_diff:
        failures.append(f"max abs logit diff {report.max_abs_logit_diff:.4g} > {tolerance.max_abs_logit_diff:g}")
    if tolerance.min_top1_agreement is not None and report.top1_agreement < tolerance.min_top1_agreement:
        failures.append(f"top-1 agreement {report.top1_agreement:.3f} < {tolerance.min_top1_agreement:g}")
    if tolerance.min_greedy_agreement is not None and report.greedy_agreement < tolerance.min_greedy_agreement:
        failures.append(f"greedy agreement {report.greedy_agreement:.3f} < {tolerance.min_greedy_agreement:g}")
    if tolerance.max_kl_divergence is not None and not report.mean_kl_divergence <= tolerance.max_kl_divergence:
        failures.append(f"mean KL divergence {report.mean_kl_divergence:.4g} > {tolerance.max_kl_divergence:g}")
    return failures


def sample_prompts(tokenizer_folder: Path, vocab_size: int = 256) -> list[list[int]]:
    """Tokenize the fixed parity prompts with the tokenizer stored in ``tokenizer_folder``.

    A tokenizer with a chat template also gets one chat-formatted prompt. A folder without a
    tokenizer gets fixed token id sequences below ``vocab_size`` instead.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except (OSError, ValueError, TypeError) as error:
        logger.warning("no usable tokenizer in %s (%s); using fixed token ids for parity", tokenizer_folder, error)
        return [[(7 * i + 3) % vocab_size for i in range(12)], [(11 * i + 5) % vocab_size for i in range(20)]]
    prompts = [tokenizer(text)["input_ids"] for text in DEFAULT_PROMPTS]
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, tokenize=True)
        prompts[-1] = list(chat)
    return [list(p) for p in prompts if p]


def onnx_model_file(folder: Path) -> Path:
    """Return the decoder ONNX file of an artifact folder.

    Raises:
        ConversionError: the folder holds no ONNX file.
    """
    for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.onnx"))
    if not candidates:
        raise ConversionError(f"{folder}: no .onnx file in the artifact")
    return candidates[0]


def compare_encoder(reference_folder: Path, candidate_file: Path, prompts: list[list[int]], tolerance: Any = None) -> ParityReport:
    """Compare an encoder export's ``last_hidden_state`` with PyTorch on the same inputs.

    Only the max absolute difference applies to an encoder; the token metrics are 1.0.
    """
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(reference_folder, dtype=torch.float32).eval()
    session = ort.InferenceSession(str(candidate_file), providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    max_diff = 0.0
    for prompt in prompts:
        ids = np.array([prompt], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feed = {k: v for k, v in feed.items() if k in input_names}
        actual = session.run(None, feed)[0]
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        max_diff = max(max_diff, float(np.abs(actual - expected).max()))
    report = ParityReport(
        max_abs_logit_diff=max_diff, top1_agreement=1.0, mean_kl_divergence=0.0, greedy_agreement=1.0,
        greedy_prefix_tokens=[], positions=sum(len(p) for p in prompts), new_tokens=0, prompts=len(prompts),
        reference="pytorch", candidate=candidate_file.name,
    )
    if tolerance is not None and tolerance.max_abs_logit_diff is not None and max_diff > tolerance.max_abs_logit_diff:
        report.failures = [f"max abs hidden-state diff {max_diff:.4g} > {tolerance.max_abs_logit_diff:g}"]
    return report
