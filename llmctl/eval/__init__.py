"""``llmctl eval``: quality, parity and speed metrics of a model, with gates for CI."""

from llmctl.eval.runner import EvalOptions, EvalRun, run_eval

__all__ = ["EvalOptions", "EvalRun", "run_eval"]
