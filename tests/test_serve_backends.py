"""The server over the ONNX Runtime and GenAI backends, and SmolLM2 int4 in the real-model tier."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest

from llmctl.serve.models import ModelSpec
from llmctl.serve.settings import ServeSettings
from tests.test_serve_support import RunningServer, running_server, slow_steps

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Tell me about Paris."}]
BACKENDS = ["ort", "genai"]


@pytest.fixture(scope="module")
def onnx_api(tiny_llama_ort: Path, tiny_llama_genai: Path) -> RunningServer:
    models = [
        ModelSpec(tiny_llama_ort, name="tiny-ort", backend="ort"),
        ModelSpec(tiny_llama_genai, name="tiny-genai", backend="genai"),
    ]
    with running_server(models, ServeSettings(max_concurrency=8)) as server:
        yield server


@pytest.fixture(scope="module")
def client(onnx_api: RunningServer) -> openai.OpenAI:
    return onnx_api.client()


def test_models_list_both_backends(onnx_api: RunningServer) -> None:
    data = httpx.get(f"{onnx_api.url}/v1/models").json()["data"]

    assert {(m["id"], m["backend"]) for m in data} == {("tiny-ort", "ort"), ("tiny-genai", "genai")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_on_backend(client: openai.OpenAI, backend: str) -> None:
    answer = client.chat.completions.create(
        model=f"tiny-{backend}", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )

    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_across_backends(client: openai.OpenAI, backend: str) -> None:
    request = dict(messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})

    reference = client.chat.completions.create(model="tiny-ort", **request).choices[0].message.content
    answer = client.chat.completions.create(model=f"tiny-{backend}", **request).choices[0].message.content

    assert answer == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_equals_whole_on_backend(client: openai.OpenAI, backend: str) -> None:
    request = dict(model=f"tiny-{backend}", prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=11)

    whole = client.completions.create(**request).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **request) if c.choices)

    assert streamed == whole


@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_logprobs_on_backend(client: openai.OpenAI, backend: str) -> None:
    answer = client.completions.create(
        model=f"tiny-{backend}", prompt="The capital of France", max_tokens=1, temperature=0, echo=True, logprobs=1
    )

    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_on_backend(client: openai.OpenAI, backend: str) -> None:
    request = dict(model=f"tiny-{backend}", prompt="Once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**request).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]

    cut = client.completions.create(stop=stop, **request).choices[0]

    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_streams_on_backend(client: openai.OpenAI, backend: str) -> None:
    def one(seed: int) -> int:
        chunks = list(
            client.completions.create(
                model=f"tiny-{backend}", prompt="Once", max_tokens=10, temperature=1.0, seed=seed, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
        )
        return chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(one, range(8)))

    assert counts == [10] * 8


@pytest.mark.realmodel
def test_smollm2_int4_answers_chat(smollm2_genai_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from llmctl.profiles import load_profile
    from llmctl.quantize import quantize

    int4 = tmp_path_factory.mktemp("smollm2-int4") / "artifact"
    quantize(smollm2_genai_fp32, int4, profile=load_profile(None), method="int4")

    with running_server([ModelSpec(int4, name="smollm2")]) as server:
        answer = server.client().chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        backend = httpx.get(f"{server.url}/v1/models").json()["data"][0]["backend"]
        schema = {
            "type": "object",
            "properties": {"capital": {"type": "string"}},
            "required": ["capital"],
            "additionalProperties": False,
        }
        structured = server.client().chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France? Reply in JSON."}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
        )

    assert "Paris" in answer.choices[0].message.content
    assert backend == "genai"
    assert "Paris" in json.loads(structured.choices[0].message.content)["capital"]


def _engine_of(api: RunningServer, name: str):
    return api.app.state.context.pool.models[name].backend._engine


def _stream_request(max_tokens: int) -> dict:
    return {
        "model": "tiny-genai", "prompt": "Once upon a time", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }


def test_genai_disconnect_stops_generation(onnx_api: RunningServer, client: openai.OpenAI) -> None:
    backend = onnx_api.app.state.context.pool.models["tiny-genai"].backend
    engine = backend._engine

    with slow_steps(backend):
        steps_before = engine.steps
        with httpx.stream("POST", f"{onnx_api.url}/v1/completions", json=_stream_request(240), timeout=30) as response:
            next(line for line in response.iter_lines() if line.startswith("data: {"))
        # The client has gone; the next request must not wait for the abandoned one.
        answer = client.chat.completions.create(model="tiny-genai", messages=CHAT, max_tokens=4, temperature=0)
        assert onnx_api.wait_until(lambda: engine.active_requests == 0)
        steps = engine.steps - steps_before

    assert answer.usage.completion_tokens == 4
    # Generating the abandoned stream to its end would take 240 steps.
    assert steps < 120


def test_genai_request_joins_running_stream(onnx_api: RunningServer, client: openai.OpenAI) -> None:
    backend = onnx_api.app.state.context.pool.models["tiny-genai"].backend
    engine = backend._engine
    order: list[str] = []

    def long_stream() -> None:
        with httpx.stream("POST", f"{onnx_api.url}/v1/completions", json=_stream_request(240), timeout=60) as response:
            for _ in response.iter_lines():
                pass
        order.append("long finished")

    with slow_steps(backend), concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        long = pool.submit(long_stream)
        assert onnx_api.wait_until(lambda: engine.active_requests == 1)
        answer = client.chat.completions.create(model="tiny-genai", messages=CHAT, max_tokens=4, temperature=0)
        order.append("short finished")
        long.result(timeout=60)

    assert answer.usage.completion_tokens == 4
    assert order == ["short finished", "long finished"]
