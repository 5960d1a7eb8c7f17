"""Shared fixtures: an offline, isolated environment and tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiny_models

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every test off the network and out of the user's caches."""
    home = tmp_path_factory.mktemp("hf-home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("LLMCTL_PROFILE", None)
    os.environ.pop("LLMCTL_API_KEY", None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-style, GQA (4 heads, 2 KV heads), tied embeddings."""
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_head_dim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-style with head_dim 32 while hidden_size / num_attention_heads is 16."""
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama-head-dim"), head_dim=32, seed=2)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


def _find_model(env: str, filename: str) -> Path | None:
    candidates = [os.environ.get(env), REPO_ROOT / ".models" / filename]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF fetched by scripts/fetch-models.sh."""
    path = _find_model("LLMCTL_SMOLLM2_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: run scripts/fetch-models.sh or set LLMCTL_SMOLLM2_GGUF")
    return path


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    path = _find_model("LLMCTL_GEMMA3_GGUF", "gemma-3-270m-q4_k_m.gguf")
    if path is None:
        pytest.skip("Gemma-3 GGUF not found: run scripts/fetch-models.sh --gemma or set LLMCTL_GEMMA3_GGUF")
    return path


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"evaluation data not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


def _convert_tiny(source: Path, out: Path, exporter: str) -> Path:
    from llmctl.convert import convert
    from llmctl.profiles import load_profile

    convert(str(source), out, profile=load_profile(None), exporter=exporter, dtype="fp32", validate=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama_genai(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` converted to fp32 by the GenAI model builder (runs on every backend but torch)."""
    return _convert_tiny(tiny_llama, tmp_path_factory.mktemp("tiny-llama-genai") / "artifact", "genai")


@pytest.fixture(scope="session")
def tiny_llama_ort(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` exported to fp32 by optimum (no genai_config.json)."""
    return _convert_tiny(tiny_llama, tmp_path_factory.mktemp("tiny-llama-ort") / "artifact", "optimum")


@pytest.fixture(scope="session")
def smollm2_genai_fp32(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF by the GenAI builder, fp32, unvalidated."""
    from llmctl.convert import convert
    from llmctl.profiles import load_profile

    out = tmp_path_factory.mktemp("smollm2-genai") / "artifact"
    convert(str(smollm2_gguf), out, profile=load_profile(None), exporter="genai", dtype="fp32", validate=False)
    return out
