"""``llmctl eval --url`` against a real ``llmctl serve`` app on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app

pytest.importorskip("llmctl.serve.app", reason="the llmctl.serve package is not installed")

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CHOICES = [
    {"ctx": "The capital of France is", "endings": ["Paris.", "Rome.", "a model.", "four bits."], "label": 0},
    {"ctx": "Quantization stores weights in", "endings": ["fewer bits.", "Japan.", "events.", "café"], "label": 0},
    {"ctx": "The server streams tokens to the", "endings": ["client.", "capital of Italy.", "number 42.", "int8."], "label": 1},
]
GENERATION = [
    {"prompt": "The capital of France is", "answer": "."},
    {"messages": [{"role": "user", "content": "Hello"}], "answer": "zzz-never"},
]


@contextmanager
def _serving(source) -> Iterator[str]:
    """Run the real server app under uvicorn in a thread and yield its /v1 URL."""
    import httpx
    import uvicorn

    from llmctl.serve.app import create_app
    from llmctl.serve.models import ModelSpec
    from llmctl.serve.settings import ServeSettings

    application = create_app([ModelSpec(source=source, name="tiny", backend="torch", threads=1)], ServeSettings())
    config = uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started or not server.servers:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.1)
        yield f"{base}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _write_suite(folder: Path) -> Path:
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHOICES), encoding="utf-8")
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENERATION), encoding="utf-8")
    suite = folder / "suite.yaml"
    suite.write_text(
        "name: served\ntasks:\n"
        f"  - {{name: ppl, type: perplexity, data: {CORPUS}, context: 64}}\n"
        "  - {name: mc, type: multiple_choice, format: hellaswag, data: mc.jsonl}\n"
        "  - {name: gen, type: generation, data: gen.jsonl, scorer: contains, max_tokens: 4}\n"
        "  - {name: speed, type: speed, prompt_tokens: 16, output_tokens: 4, repeats: 1}\n"
        "gates: ['mc.acc >= 0', 'gen.accuracy >= 0']\n",
        encoding="utf-8",
    )
    return suite


def test_eval_through_llmctl_serve(tiny_llama: Path, tmp_path: Path) -> None:
    from llmctl.eval.target import LocalTarget
    from llmctl.runtime import open_backend

    suite = _write_suite(tmp_path)
    with _serving(tiny_llama) as url:
        result = CliRunner().invoke(app, ["eval", "--url", url, "--suite", str(suite), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["target"]["kind"] == "url"
    assert document["target"]["model"] == "tiny"
    statuses = {task["name"]: task["status"] for task in document["tasks"]}
    assert statuses == {"ppl": "ok", "mc": "ok", "gen": "ok", "speed": "ok"}
    assert document["metrics"]["speed.decode_tps"]["value"] > 0
    assert document["metrics"]["speed.peak_memory_mb"]["value"] is None
    assert document["metrics"]["ppl.perplexity"]["value"] > 1

    # The server's echoed log-probabilities give the same choices as scoring in process.
    local = LocalTarget(open_backend(tiny_llama, "torch", threads=1))
    requests = [(r["ctx"], " " + e) for r in CHOICES for e in r["endings"]]
    with _serving(tiny_llama) as url:
        from llmctl.eval.client import HttpTarget

        remote = HttpTarget(url)
        try:
            served = remote.loglikelihoods(requests)
        finally:
            remote.close()
    expected = local.loglikelihoods(requests)
    assert served == pytest.approx(expected, abs=1e-3)


def test_eval_server_without_prompt_logprobs(tiny_llama: Path, tmp_path: Path) -> None:
    """Log-likelihood tasks are skipped with the server's reason; generation still runs."""
    from llmctl.runtime.base import Capabilities
    from llmctl.runtime.torch import TorchBackend

    class NoPromptLogprobs(TorchBackend):
        capabilities = Capabilities(logprobs=True, prompt_logprobs=False)

    suite = _write_suite(tmp_path)
    with _serving(NoPromptLogprobs(tiny_llama, threads=1)) as url:
        result = CliRunner().invoke(app, ["eval", "--url", url, "--suite", str(suite), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    tasks = {task["name"]: task for task in document["tasks"]}
    assert tasks["mc"]["status"] == "skipped"
    assert "echo with logprobs" in tasks["mc"]["reason"]
    assert tasks["ppl"]["status"] == "skipped"
    assert tasks["gen"]["status"] == "ok"
    outcomes = {gate["expression"]: gate["outcome"] for gate in document["gates"]}
    assert outcomes == {"mc.acc >= 0": "skipped", "gen.accuracy >= 0": "pass"}
