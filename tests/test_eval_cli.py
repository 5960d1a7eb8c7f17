"""``llmctl eval`` through the CLI: exit codes, output files, reproducibility and bad input."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from xml.etree import ElementTree

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

CHOICES = [
    {"ctx": "The capital of France is", "endings": ["Paris.", "Rome.", "a model.", "four bits."], "label": 0},
    {"ctx": "Quantization stores weights in", "endings": ["fewer bits.", "Japan.", "events.", "café"], "label": 0},
    {"ctx": "The server streams tokens to the", "endings": ["client.", "capital of Italy.", "number 42.", "int8."], "label": 1},
    {"ctx": "Perplexity is the exponential of", "endings": ["the mean loss.", "Rome.", "0 1 2", "a"], "label": 0},
    {"ctx": "Hello, world! How are", "endings": ["you today?", "weights", "naïve", "b"], "label": 0},
    {"ctx": "int8 uses eight bits and int4 uses", "endings": ["four bits.", "Tokyo.", "a server.", "c"], "label": 0},
]
GENERATION = [
    {"prompt": "The capital of France is", "answer": ["Paris", "."]},
    {"messages": [{"role": "user", "content": "Hello"}], "answer": "zzz-never"},
    {"prompt": "Numbers: 0 1 2", "answer": "[0-9 ]*", "note": "regex-like text is literal for contains"},
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _suite(folder: Path, name: str, tasks: str, gates: list[str] | None = None) -> Path:
    gate_lines = "".join(f"  - {json.dumps(g)}\n" for g in gates or []) or "  []\n"
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ntasks:\n{tasks}gates:\n{gate_lines}", encoding="utf-8")
    return path


TASKS = (
    f"  - {{name: ppl, type: perplexity, data: {CORPUS}, context: 64, stride: 32}}\n"
    "  - {name: mc, type: multiple_choice, format: hellaswag, data: mc.jsonl, limit: 4}\n"
    "  - {name: gen, type: generation, data: gen.jsonl, scorer: contains, max_tokens: 4}\n"
    "  - {name: speed, type: speed, prompt_tokens: 16, output_tokens: 4, repeats: 1}\n"
)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval-suites")
    _write_jsonl(folder / "mc.jsonl", CHOICES)
    _write_jsonl(folder / "gen.jsonl", GENERATION)
    return folder


def _eval(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, ["eval", *args, "--backend", "torch", "--threads", "1"], env=env)
    return result


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: "), result.stderr
    assert all(line.startswith("  hint: ") for line in lines[1:]), result.stderr
    return lines[0]


# --- gates and outputs --------------------------------------------------------------------


def test_eval_passes_and_writes_outputs(tiny_llama: Path, suite_dir: Path, tmp_path: Path) -> None:
    suite = _suite(suite_dir, "passing", TASKS, ["mc.acc >= 0", "ppl.perplexity > 1", "wilson_lower(mc.acc) >= 0", "decode_tps > 0"])
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    out, junit, markdown = tmp_path / "r.json", tmp_path / "junit.xml", tmp_path / "summary.md"
    result = _eval(str(tiny_llama), "--suite", str(suite), "-o", str(out), "--junit", str(junit), "--markdown", str(markdown),
                   env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 0, result.output
    assert "mc.acc >= 0" in result.stdout

    document = json.loads(out.read_text())
    assert document["schema_version"] == 1
    assert document["passed"] is True
    assert document["target"]["kind"] == "hf-folder"
    assert len(document["target"]["sha256"]) == 64
    assert document["tool_versions"]["llmctl"]
    assert document["profile"]["name"] == "cpu-x86-avx2"
    assert document["suite"]["name"] == "passing"
    mc = next(task for task in document["tasks"] if task["name"] == "mc")
    assert mc["dataset"]["samples"] == 4
    assert mc["dataset"]["records"] == len(CHOICES)
    assert len(mc["dataset"]["sha256"]) == 64
    for name, entry in document["metrics"].items():
        assert {"value", "stderr", "samples"} <= set(entry), name
    assert document["metrics"]["mc.acc"]["samples"] == 4
    assert len(document["metrics"]["mc.acc"]["wilson95"]) == 2
    assert document["metrics"]["speed.decode_tps"]["value"] > 0
    speed = next(task for task in document["tasks"] if task["name"] == "speed")
    assert speed["details"]["profile"]["name"] == "cpu-x86-avx2"
    assert [g["outcome"] for g in document["gates"]] == ["pass"] * 4
    assert all(g["threshold"] is not None for g in document["gates"])

    root = ElementTree.parse(junit).getroot()
    cases = root.findall("./testsuite/testcase")
    assert [case.get("name") for case in cases] == [g["expression"] for g in document["gates"]]
    assert root.find("./testsuite").get("failures") == "0"
    assert not root.findall(".//failure")

    text = markdown.read_text()
    assert text.startswith("## llmctl eval: ✅ passed")
    assert "| `mc.acc >= 0` |" in text
    assert "| mc | acc |" in text
    assert summary.read_text() == "earlier step\n" + text + "\n"


def test_eval_failing_gate_exits_one(tiny_llama: Path, suite_dir: Path, tmp_path: Path) -> None:
    suite = _suite(suite_dir, "failing", TASKS, ["mc.acc >= 0", "ppl.perplexity < 1"])
    out, junit = tmp_path / "r.json", tmp_path / "junit.xml"
    result = _eval(str(tiny_llama), "--suite", str(suite), "-o", str(out), "--junit", str(junit))
    assert result.exit_code == 1, result.output
    assert "1 of 2 gates failed: ppl.perplexity < 1" in result.stderr

    document = json.loads(out.read_text())
    assert document["passed"] is False
    assert [g["outcome"] for g in document["gates"]] == ["pass", "fail"]
    failures = ElementTree.parse(junit).getroot().findall(".//failure")
    assert len(failures) == 1
    assert "required < 1" in failures[0].get("message")


def test_eval_baseline_gates(tiny_llama: Path, suite_dir: Path, tmp_path: Path) -> None:
    tasks = f"  - {{name: ppl, type: perplexity, data: {CORPUS}, context: 64, stride: 32}}\n"
    plain = _suite(suite_dir, "plain", tasks)
    baseline = tmp_path / "baseline.json"
    assert _eval(str(tiny_llama), "--suite", str(plain), "-o", str(baseline)).exit_code == 0

    relative = _suite(suite_dir, "relative", tasks, ["perplexity <= baseline * 1.001"])
    result = _eval(str(tiny_llama), "--suite", str(relative), "--baseline", str(baseline), "--json")
    assert result.exit_code == 0, result.output
    gate = json.loads(result.stdout)["gates"][0]
    assert gate["outcome"] == "pass"
    assert gate["baseline"] == pytest.approx(json.loads(baseline.read_text())["metrics"]["ppl.perplexity"]["value"])

    stricter = _suite(suite_dir, "stricter", tasks, ["perplexity <= baseline * 0.5"])
    assert _eval(str(tiny_llama), "--suite", str(stricter), "--baseline", str(baseline)).exit_code == 1

    line = _one_line_error(_eval(str(tiny_llama), "--suite", str(relative)))
    assert "--baseline" in line


def test_eval_same_seed_same_numbers(tiny_llama: Path, suite_dir: Path) -> None:
    tasks = (
        "  - {name: mc, type: multiple_choice, format: hellaswag, data: mc.jsonl, limit: 3}\n"
        "  - {name: gen, type: generation, data: gen.jsonl, scorer: contains, max_tokens: 4, limit: 2}\n"
    )
    suite = _suite(suite_dir, "seeded", tasks)
    runs = [json.loads(_eval(str(tiny_llama), "--suite", str(suite), "--seed", str(seed), "--json").stdout) for seed in (0, 0, 1)]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert runs[0]["tasks"][0]["dataset"] == runs[1]["tasks"][0]["dataset"]
    assert runs[0]["tasks"][0]["dataset"]["indices"] != runs[2]["tasks"][0]["dataset"]["indices"]


def test_eval_absent_shared_data_is_skipped(tiny_llama: Path, suite_dir: Path, tmp_path: Path) -> None:
    tasks = (
        "  - {name: hellaswag, type: multiple_choice, format: hellaswag, data: '${LLMCTL_DATASETS}/hellaswag/val.jsonl'}\n"
        f"  - {{name: ppl, type: perplexity, data: {CORPUS}, context: 64}}\n"
    )
    suite = _suite(suite_dir, "absent", tasks, ["hellaswag.acc >= 0.9", "ppl.perplexity > 0"])
    result = _eval(str(tiny_llama), "--suite", str(suite), "--json", env={"LLMCTL_DATASETS": str(tmp_path / "nowhere")})
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    hellaswag = document["tasks"][0]
    assert hellaswag["status"] == "skipped"
    assert "LLMCTL_DATASETS" in hellaswag["reason"]
    assert [g["outcome"] for g in document["gates"]] == ["skipped", "pass"]


def test_builtin_quick_suite_validates() -> None:
    from llmctl.eval.suite import builtin_suite_names, load_suite

    assert {"quick", "full"} <= set(builtin_suite_names())
    for name in ("quick", "full"):
        suite, path = load_suite(name)
        assert path.is_file()
        assert suite.tasks


# --- bad input: one line, exit 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a", "endings": ["b"\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"ctx": "a", "label": 0}\n', r"bad\.jsonl:1: missing field 'endings'"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 5}\n', r"bad\.jsonl:1: field 'label' must be a choice index"),
        ("\n\n", r"bad\.jsonl is empty"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_eval_bad_jsonl(tiny_llama: Path, tmp_path: Path, lines: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text(lines, encoding="utf-8")
    suite = _suite(tmp_path, "bad", "  - {name: mc, type: multiple_choice, format: hellaswag, data: bad.jsonl}\n")
    import re

    assert re.search(message, _one_line_error(_eval(str(tiny_llama), "--suite", str(suite))))


def test_eval_missing_data_file(tiny_llama: Path, tmp_path: Path) -> None:
    suite = _suite(tmp_path, "missing", "  - {name: mc, type: multiple_choice, format: hellaswag, data: absent.jsonl}\n")
    line = _one_line_error(_eval(str(tiny_llama), "--suite", str(suite)))
    assert "absent.jsonl not found" in line


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: s\ntasks:\n  - {name: t, type: perplexity, data: x.txt, contxt: 5}\n", "tasks.0.perplexity.contxt: unknown key"),
        ("name: s\ntasks:\n  - {name: t, type: perplexity, data: x.txt}\ngates: ['t.accuracy >= 1']\n", "unknown metric 't.accuracy'"),
        ("name: s\ntasks:\n  - {name: t, type: ranking, data: x.txt}\n", "tasks.0"),
        ("name: s\ntasks: []\n", "tasks"),
        ("name: s\ntasks:\n  - {name: t, type: perplexity, data: x.txt}\ngates: ['t.perplexity ~ 3']\n", "invalid gate"),
        ("name: s\ntasks:\n  - {name: t, type: multiple_choice, format: custom, data: x.jsonl}\n", "needs a mapping"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_eval_bad_suite(tiny_llama: Path, tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(body, encoding="utf-8")
    line = _one_line_error(_eval(str(tiny_llama), "--suite", str(path)))
    assert message in line
    assert str(path) in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "nonexistent"], "unknown suite 'nonexistent'"),
        (["--suite", "missing/suite.yaml"], "not found"),
        (["--baseline", "missing.json"], "baseline file missing.json not found"),
        (["--reference", "no-such-folder"], "reference folder no-such-folder not found"),
        (["--gate", "nothing.metric >= 1"], "unknown metric 'nothing.metric'"),
    ],
)
def test_eval_bad_options(tiny_llama: Path, args: list[str], message: str) -> None:
    assert message in _one_line_error(_eval(str(tiny_llama), *args))


def test_eval_needs_a_target() -> None:
    assert "no model to evaluate" in _one_line_error(_eval())
    assert "not found" in _one_line_error(_eval("/no/such/model"))


def test_eval_target_and_url_conflict(tiny_llama: Path) -> None:
    assert "not both" in _one_line_error(_eval(str(tiny_llama), "--url", "http://127.0.0.1:9/v1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_eval_unreachable_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    line = _one_line_error(_eval("--url", url, "--suite", "quick"))
    assert f"cannot reach {url}/models" in line


@pytest.fixture()
def failing_server():
    """A server on 127.0.0.1 that lists a model and responds to every other request with HTTP 500."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
            self._send(200, {"object": "list", "data": [{"id": "broken", "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(500, {"error": {"message": "model crashed", "type": "server_error"}})

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_eval_server_errors(failing_server: str, suite_dir: Path) -> None:
    suite = _suite(suite_dir, "server-mc", "  - {name: mc, type: multiple_choice, format: hellaswag, data: mc.jsonl}\n")
    line = _one_line_error(_eval("--url", failing_server, "--suite", str(suite)))
    assert "failed with HTTP 500: model crashed" in line

    generation = _suite(suite_dir, "server-gen", "  - {name: gen, type: generation, data: gen.jsonl}\n")
    line = _one_line_error(_eval("--url", failing_server, "--suite", str(generation)))
    assert "/chat/completions failed with HTTP 500" in line or "/completions failed with HTTP 500" in line
