"""Quality, parity and speed of SmolLM2-135M-Instruct side by side: PyTorch fp32, ONNX fp32, int8, int4.

    .venv/bin/python bench/eval_quality.py [--gguf FILE] [--datasets DIR] [--wikitext-tokens N]
                                           [--hellaswag N] [--workdir DIR] [--json FILE]

Builds the four variants from the GGUF file. transformers dequantizes it to a PyTorch fp32
folder, ``llmctl.convert`` exports ONNX fp32 with the GenAI builder, and ``llmctl.quantize``
makes int8 and int4 from that. Then it runs ``llmctl eval`` on each with one suite: WikiText-2
test perplexity (context 1024, stride 512), HellaSwag accuracy on a fixed seeded sample, KL
divergence and top-1 agreement against the PyTorch fp32 model, decode tokens/s, and the
artifact size. Prints one Markdown table. Run it alone on the machine: timings move with load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUITE = """\
name: eval-quality
tasks:
  - name: wikitext2
    type: perplexity
    data: {datasets}/wikitext2/test.raw.txt
    context: 1024
    stride: 512
{max_tokens}
  - name: hellaswag
    type: multiple_choice
    format: hellaswag
    data: {datasets}/hellaswag/val.jsonl
    limit: {hellaswag}
  - name: parity
    type: parity
    data: {datasets}/wikitext2/test.raw.txt
    samples: {parity_samples}
    length: 128
    greedy_tokens: 32
  - name: speed
    type: speed
    prompt_tokens: 128
    output_tokens: 128
    repeats: 5
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_pytorch_fp32(gguf: Path, out: Path) -> Path:
    """Dequantize the GGUF into a Hugging Face fp32 folder, without the copy of the GGUF in tokenizer.model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


def build_variants(gguf: Path, workdir: Path) -> dict[str, Path]:
    """Return the four model folders by name, building those that are missing."""
    from llmctl.convert import convert
    from llmctl.profiles import load_profile
    from llmctl.quantize import quantize

    profile = load_profile(None)
    variants = {"PyTorch fp32": build_pytorch_fp32(gguf, workdir / "torch-fp32")}
    onnx = workdir / "onnx-fp32"
    if not onnx.exists():
        convert(str(gguf), onnx, profile=profile, exporter="genai", dtype="fp32", validate=False)
    variants["ONNX fp32"] = onnx
    for method in ("int8", "int4"):
        out = workdir / f"onnx-{method}"
        if not out.exists():
            quantize(onnx, out, profile=profile, method=method, validate=False)
        variants[f"ONNX {method}"] = out
    return variants


def evaluate(folder: Path, reference: Path, suite: Path, backend: str) -> dict:
    from llmctl.eval import EvalOptions, run_eval

    options = EvalOptions(target=folder, suite=str(suite), reference=reference, backend=backend, seed=0)
    return run_eval(options).document


def row_of(name: str, folder: Path, document: dict, seconds: float) -> dict:
    metrics = document["metrics"]

    def value(key: str) -> float | None:
        return metrics[key]["value"]

    return {
        "variant": name, "backend": document["target"]["backend"], "size_mb": folder_bytes(folder) / 1e6,
        "perplexity": value("wikitext2.perplexity"), "perplexity_tokens": metrics["wikitext2.perplexity"]["samples"],
        "hellaswag_acc": value("hellaswag.acc"), "hellaswag_acc_norm": value("hellaswag.acc_norm"),
        "hellaswag_samples": metrics["hellaswag.acc"]["samples"], "kl_mean": value("parity.kl_mean"),
        "top1_agreement": value("parity.top1_agreement"), "decode_tps": value("speed.decode_tps"), "eval_s": seconds,
    }


def print_table(rows: list[dict]) -> None:
    def fmt(number: float | None, pattern: str) -> str:
        return "-" if number is None else format(number, pattern)

    print("| variant | backend | WikiText-2 ppl | HellaSwag acc / acc_norm | KL vs fp32 | top-1 vs fp32 | decode tok/s | size MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['backend']} | {fmt(row['perplexity'], '.2f')} | "
            f"{fmt(row['hellaswag_acc'], '.3f')} / {fmt(row['hellaswag_acc_norm'], '.3f')} | "
            f"{fmt(row['kl_mean'], '.4f')} | {fmt(row['top1_agreement'], '.3f')} | {fmt(row['decode_tps'], '.1f')} | "
            f"{row['size_mb']:.0f} |"
        )
    first = rows[0]
    print(f"\nWikiText-2 tokens scored: {first['perplexity_tokens']}; HellaSwag questions: {first['hellaswag_samples']} (seed 0).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--wikitext-tokens", type=int, default=None, help="score only the first N tokens; default: the whole test split")
    parser.add_argument("--hellaswag", type=int, default=1000, help="HellaSwag questions in the fixed sample")
    parser.add_argument("--parity-samples", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built models here and reuse them")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    if not args.gguf.is_file():
        print(f"error: {args.gguf} not found; run scripts/fetch-models.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        suite = workdir / "suite.yaml"
        suite.write_text(SUITE.format(
            datasets=args.datasets, hellaswag=args.hellaswag, parity_samples=args.parity_samples,
            max_tokens=f"    max_tokens: {args.wikitext_tokens}" if args.wikitext_tokens else "",
        ), encoding="utf-8")

        variants = build_variants(args.gguf, workdir)
        reference = variants["PyTorch fp32"]
        rows = []
        for name, folder in variants.items():
            started = time.perf_counter()
            document = evaluate(folder, reference, suite, "torch" if name.startswith("PyTorch") else "auto")
            rows.append(row_of(name, folder, document, time.perf_counter() - started))
            print(f"  {name}: {rows[-1]['eval_s']:.0f} s", file=sys.stderr)

    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
