"""PyTorch backend: a Hugging Face checkpoint through transformers, the reference for parity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import RuntimeBackendError
from llmctl.runtime.base import Capabilities
from llmctl.runtime.common import LogitsBackend

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class TorchBackend(LogitsBackend):
    """Runs ``AutoModelForCausalLM`` in float32 on the CPU with a KV cache; samples with numpy."""

    name = "torch"
    capabilities = Capabilities(logprobs=True, prompt_logprobs=True, logit_bias=True, penalties=True, json_schema=True)

    def __init__(self, model_path: Path, *, threads: int = 0, **options: Any) -> None:
        super().__init__(model_path, threads=threads, **options)
        self.model: Any = None

    @classmethod
    def can_load(cls, model_path: Path) -> bool:
        folder = Path(model_path)
        return (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if self.threads:
            # NOTE: torch's intra-op thread count is process-wide, not per model.
            torch.set_num_threads(self.threads)
        logger.info("loading %s with transformers", self.model_path)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise RuntimeBackendError(
                f"transformers cannot load {self.model_path}: {error}",
                hint="the torch backend needs a Hugging Face folder with config.json and weights",
            ) from error
        self.model.eval()
        self._load_tokenizer()

    def _forward(self, ids: Any, mask: Any, cache: Any, positions: Any) -> tuple[Any, Any]:
        import torch

        model = self._model()
        with torch.inference_mode():
            output = model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True)
        return output.logits, output.past_key_values

    def _prefill(self, token_ids: list[int]) -> tuple[np.ndarray, Any]:
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([token_ids], dtype=torch.long)
        positions = torch.arange(len(token_ids)).unsqueeze(0)
        logits, cache = self._forward(ids, torch.ones_like(ids), DynamicCache(), positions)
        return logits[0, -1].float().numpy(), cache

    def _decode_step(self, token_id: int, position: int, cache: Any) -> tuple[np.ndarray, Any]:
        import torch

        ids = torch.tensor([[token_id]], dtype=torch.long)
        mask = torch.ones((1, position + 1), dtype=torch.long)
        logits, cache = self._forward(ids, mask, cache, torch.tensor([[position]]))
        return logits[0, -1].float().numpy(), cache

    def _batch_logits(self, sequences: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        positions = torch.arange(width).unsqueeze(0).expand(len(sequences), -1)
        with torch.inference_mode():
            logits = self._model()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        return logits.float().numpy()

    def _model(self) -> Any:
        if self.model is None:
            raise RuntimeBackendError(f"the torch backend for {self.model_path} is not loaded", hint="call load() first")
        return self.model

    def close(self) -> None:
        self.model = None
