"""Server limits and start-up: API key, body size, queue, loading state, signals, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from llmctl.serve.errors import APIError
from llmctl.serve.metrics import ServerMetrics
from llmctl.serve.models import ModelSpec
from llmctl.serve.scheduler import Scheduler
from llmctl.serve.settings import ServeSettings
from tests.test_serve_support import WrappedBackend, free_port, running_server

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny_torch(tiny_llama: Path):
    from llmctl.runtime.torch import TorchBackend

    backend = TorchBackend(tiny_llama)
    backend.load()
    yield backend
    backend.close()


# ---------------------------------------------------------------- scheduler units


def test_scheduler_queues_then_rejects() -> None:
    async def scenario() -> tuple[int, int, int]:
        scheduler = Scheduler(max_concurrency=1, max_queue=1, metrics=ServerMetrics(), retry_after_s=3)
        first = await scheduler.acquire()
        waiting = asyncio.ensure_future(scheduler.acquire())
        await asyncio.sleep(0)
        with pytest.raises(APIError) as rejected:
            await scheduler.acquire()
        queued = scheduler.waiting
        first.release()
        second = await waiting
        running = scheduler.running
        second.release()
        second.release()  # a second release is ignored
        return rejected.value.status, queued, running + scheduler.running * 10

    status, queued, running = asyncio.run(scenario())

    assert status == 429
    assert queued == 1
    assert running == 1


def test_scheduler_cancelled_waiter_leaves_queue() -> None:
    async def scenario() -> int:
        scheduler = Scheduler(max_concurrency=1, max_queue=4, metrics=ServerMetrics())
        held = await scheduler.acquire()
        waiter = asyncio.ensure_future(scheduler.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        held.release()
        return scheduler.running + scheduler.waiting

    assert asyncio.run(scenario()) == 0


def test_scheduler_counts_slots_in_order() -> None:
    async def scenario() -> list[str]:
        scheduler = Scheduler(max_concurrency=4, max_queue=4, metrics=ServerMetrics())
        order: list[str] = []
        big = await scheduler.acquire(3)

        async def take(name: str, slots: int):
            slot = await scheduler.acquire(slots)
            order.append(name)
            return slot

        pair = asyncio.ensure_future(take("pair", 2))
        await asyncio.sleep(0)
        # One slot is free, but the single request queued behind the pair must not overtake it.
        single = asyncio.ensure_future(take("single", 1))
        await asyncio.sleep(0)
        order.append(f"running={scheduler.running}")
        big.release()
        held = [await pair, await single]
        order.append(f"running={scheduler.running}")
        for slot in held:
            slot.release()
        order.append(f"running={scheduler.running}")
        return order

    assert asyncio.run(scenario()) == ["running=3", "pair", "single", "running=3", "running=0"]


def test_scheduler_cancels_several_queued_waiters() -> None:
    async def scenario() -> tuple[int, int]:
        scheduler = Scheduler(max_concurrency=2, max_queue=8, metrics=ServerMetrics())
        taken = await scheduler.acquire(2)
        waiters = [asyncio.ensure_future(scheduler.acquire(2)) for _ in range(3)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        taken.release()
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        return scheduler.running, scheduler.waiting

    assert asyncio.run(scenario()) == (0, 0)


def test_scheduler_rejects_more_slots_than_exist() -> None:
    scheduler = Scheduler(max_concurrency=2, max_queue=4, metrics=ServerMetrics())
    with pytest.raises(ValueError, match="3 slots of 2"):
        asyncio.run(scheduler.acquire(3))


# ---------------------------------------------------------------- API key and body size


@pytest.fixture(scope="module")
def guarded(tiny_torch):
    settings = ServeSettings(api_key="s3cret-key", max_body_bytes=4096)
    with running_server([ModelSpec(WrappedBackend(tiny_torch), name="tiny")], settings) as server:
        yield server


def test_api_key_missing_is_401(guarded) -> None:
    response = httpx.post(f"{guarded.url}/v1/chat/completions", json={"model": "tiny", "messages": CHAT})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_api_key_wrong_is_401(guarded) -> None:
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="s3cret-kez").models.list()


def test_api_key_right_is_accepted(guarded) -> None:
    answer = guarded.client(api_key="s3cret-key").chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)

    assert answer.choices


def test_health_needs_no_key(guarded) -> None:
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_metrics_need_the_key(guarded) -> None:
    assert httpx.get(f"{guarded.url}/metrics").status_code == 401


def test_body_too_large_is_413(guarded) -> None:
    body = {"model": "tiny", "prompt": "x" * 10_000}

    response = httpx.post(f"{guarded.url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret-key"})

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_chunked_body_too_large_is_413(guarded) -> None:
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(
        f"{guarded.url}/v1/completions", content=chunks(), headers={"Authorization": "Bearer s3cret-key"}
    )

    assert response.status_code == 413


# ---------------------------------------------------------------- queue


def test_queue_full_is_429_with_retry_after(tiny_torch) -> None:
    slow = WrappedBackend(tiny_torch, delay_s=0.05)
    settings = ServeSettings(max_concurrency=1, max_queue=0, retry_after_s=2)
    body = {"model": "slow", "prompt": "Hi", "max_tokens": 100, "stream": True, "ignore_eos": True}

    with running_server([ModelSpec(slow, name="slow")], settings) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as busy:
            lines = busy.iter_lines()  # kept referenced: a discarded iterator closes the connection
            next(line for line in lines if line.startswith("data: {"))
            rejected = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False})
        # The slot comes back once the stream above is closed.
        assert server.wait_until(lambda: server.metric("llmctl_running_requests") == 0, timeout=10)
        accepted = server.client().completions.create(model="slow", prompt="Hi", max_tokens=2)

    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "2"
    assert rejected.json()["error"]["type"] == "rate_limit_exceeded"
    assert accepted.choices


def test_queued_request_waits_for_slot(tiny_torch) -> None:
    slow = WrappedBackend(tiny_torch, delay_s=0.02)
    settings = ServeSettings(max_concurrency=1, max_queue=4)

    with running_server([ModelSpec(slow, name="slow")], settings) as server:
        client = server.client()
        results: list[int] = []

        def one() -> None:
            answer = client.completions.create(model="slow", prompt="Hi", max_tokens=10, extra_body={"ignore_eos": True})
            results.append(answer.usage.completion_tokens)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert results == [10, 10, 10]


def test_request_larger_than_capacity_is_400(tiny_torch) -> None:
    settings = ServeSettings(max_concurrency=4, max_queue=4)

    with running_server([ModelSpec(WrappedBackend(tiny_torch), name="tiny")], settings) as server:
        too_many = httpx.post(
            f"{server.url}/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}
        )
        fits = server.client().completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=2)

    assert too_many.status_code == 400
    assert "6 sequences (3 prompts x n=2)" in too_many.json()["error"]["message"]
    assert "--max-concurrency" in too_many.json()["error"]["message"]
    assert len(fits.choices) == 4


# ---------------------------------------------------------------- loading state


def test_health_503_until_loaded(tiny_torch) -> None:
    gate = threading.Event()
    backend = WrappedBackend(tiny_torch, load_gate=gate)

    with running_server([ModelSpec(backend, name="tiny")], wait_ready=False) as server:
        loading = httpx.get(f"{server.url}/health")
        early = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        gate.set()
        assert server.wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200)

    assert loading.status_code == 503
    assert loading.json()["status"] == "loading"
    assert early.status_code == 503
    assert early.json()["error"]["code"] == "model_loading"


# ---------------------------------------------------------------- CLI and process


def test_cli_rejects_name_count_mismatch(tiny_llama: Path) -> None:
    from llmctl.cli.main import app

    result = CliRunner().invoke(app, ["serve", str(tiny_llama), "--served-model-name", "a", "--served-model-name", "b"])

    assert result.exit_code == 2
    assert "--served-model-name" in result.output


def test_cli_rejects_missing_folder(tmp_path: Path) -> None:
    from llmctl.cli.main import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing"), "--port", "0"])

    assert result.exit_code == 2
    assert "not found" in result.output


def _start_cli(model: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LLMCTL_API_KEY": "k"}
    command = [sys.executable, "-m", "llmctl", "serve", str(model), "--backend", "torch", "--port", str(port), *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_healthy(process: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_cli_signal_finishes_in_flight_and_exits_0(tiny_llama: Path, sig: signal.Signals) -> None:
    port = free_port()
    process = _start_cli(tiny_llama, port, "--served-model-name", "tiny")
    try:
        _wait_healthy(process, port)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, headers={"Authorization": "Bearer k"}
        ) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            process.send_signal(sig)
            rest = [line for line in lines if line]
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert rest[-1] == "data: [DONE]"
    assert process.returncode == 0, stderr
    assert "server stopped" in stderr


@pytest.mark.slow
def test_cli_reports_load_failure(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not weights")

    process = _start_cli(broken, free_port())
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 1
    assert "error:" in stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------- user values, shutdown, logs


def post_json(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON, so that lone surrogates travel as ``\\ud800`` escapes."""
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def checked(tiny_torch):
    settings = ServeSettings(default_max_tokens=5)
    with running_server([ModelSpec(WrappedBackend(tiny_torch), name="tiny")], settings) as server:
        yield server


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "seed": 2**63}, "seed"),
        ({"prompt": "Hi", "seed": -1}, "seed"),
        ({"prompt": "Hi", "seed": 1e23}, "seed"),
        ({"prompt": "Hi\ud800"}, "prompt"),
        ({"prompt": ["ok", "bad\udfff"]}, "prompt"),
        ({"prompt": [5, -3]}, "prompt"),
        ({"prompt": "Hi", "stop": "\ud800"}, "stop"),
    ],
    ids=["seed-2**63", "seed-negative", "seed-1e23", "surrogate", "surrogate-in-list", "negative-token", "surrogate-stop"],
)
def test_completion_bad_value_is_400(checked, body: dict, param: str) -> None:
    response = post_json(f"{checked.url}/v1/completions", {"model": "tiny", "max_tokens": 2, **body})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_chat_surrogate_names_field(checked) -> None:
    messages = [{"role": "user", "content": "Hi\ud800"}]
    response = post_json(f"{checked.url}/v1/chat/completions", {"model": "tiny", "messages": messages})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content"
    assert "surrogate" in response.json()["error"]["message"]
    assert "more problem" not in response.json()["error"]["message"]


def test_tokenize_surrogate_is_400(checked) -> None:
    response = post_json(f"{checked.url}/tokenize", {"model": "tiny", "prompt": "\udc00"})

    assert response.status_code == 400


def test_large_seed_is_served(checked) -> None:
    answer = checked.client().completions.create(model="tiny", prompt="Hi", max_tokens=3, seed=2**63 - 1, temperature=1)

    assert answer.usage.completion_tokens >= 1


def test_chat_default_max_tokens(checked) -> None:
    answer = checked.client().chat.completions.create(model="tiny", messages=CHAT, extra_body={"ignore_eos": True})
    models = httpx.get(f"{checked.url}/v1/models").json()

    assert answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"
    assert models["data"][0]["max_model_len"] == 256


def test_access_log_line(checked, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="llmctl.serve.access"):
        response = httpx.post(
            f"{checked.url}/v1/completions", json={"model": "tiny", "prompt": "secret prompt", "max_tokens": 2},
            headers={"x-request-id": "req-42"},
        )
        assert checked.wait_until(lambda: any("req-42" in r.getMessage() for r in caplog.records), timeout=5)

    line = next(r.getMessage() for r in caplog.records if "req-42" in r.getMessage())
    assert response.status_code == 200
    assert line.startswith("POST /v1/completions 200 ")
    assert line.endswith("ms request_id=req-42")
    assert "secret" not in line


def test_shutdown_ends_stream_with_error(tiny_torch) -> None:
    slow = WrappedBackend(tiny_torch, delay_s=0.05)
    body = {"model": "slow", "prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}

    with running_server([ModelSpec(slow, name="slow")]) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            server.app.state.context.shut_down()
            rest = [line for line in lines if line]
        late = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False})

    chunks = [line for line in rest if line.startswith("data: {")]
    assert rest[-1] == "data: [DONE]"
    assert '"server_shutting_down"' in chunks[-1]
    assert len(chunks) < 100
    assert late.status_code == 503


def test_cli_port_in_use_exits_1(tiny_llama: Path) -> None:
    from llmctl.cli.main import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tiny_llama), "--backend", "torch", "--port", str(port)])

    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.output
    assert "--port 0" in result.output
    assert "serving" not in result.output


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--host", "999.1.1.1"], "--host '999.1.1.1' is not a valid address"),
        (["--threads", "100000"], "--threads 100000 is outside 0.."),
        (["--backend", "vllm"], "unknown runtime backend 'vllm'"),
    ],
    ids=["bad-host", "threads", "backend"],
)
def test_cli_usage_mistake_exits_2(tiny_llama: Path, extra: list[str], expected: str) -> None:
    from llmctl.cli.main import app

    result = CliRunner().invoke(app, ["serve", str(tiny_llama), "--port", "0", *extra])

    assert result.exit_code == 2
    assert expected in result.output
    assert result.output.count("error:") == 1
    assert "serving" not in result.output


def test_cli_gguf_file_hints_convert(tmp_path: Path) -> None:
    from llmctl.cli.main import app

    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(app, ["serve", str(gguf), "--port", "0"])

    assert result.exit_code == 2
    assert f"llmctl convert {gguf} -o DIR" in result.output


def test_cli_help_lists_exit_codes() -> None:
    from llmctl.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"])

    assert "Exit codes" in result.output
    assert "--default-max-tokens" in result.output


def test_log_record_is_one_line_in_files(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from llmctl.log import stderr_handler

    handler = stderr_handler("%(message)s")
    handler.emit(logging.LogRecord("llmctl.test", logging.INFO, __file__, 1, "x" * 300, None, None))
    written = capsys.readouterr().err

    assert written.count("\n") == 1
    assert "INFO " + "x" * 300 in written
