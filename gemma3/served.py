"""The MLflow Model the pipeline logs: gemma3's own loading and generation behind `mlflow.pyfunc`.

The model's only artifact is the checkpoint directory (one copy of the weights). A request is
checked with the CLI's rules before anything is generated, and a bad field is an HTTP 400 that
names it (an `MlflowException` with INVALID_PARAMETER_VALUE, which MLflow's scoring server maps
to 400): at most `MAX_PROMPTS` prompts, each shorter than the context; `max_new_tokens` in
0..context_length (then capped at what each prompt leaves, as `gemma3 generate` caps it);
temperature >= 0, top_k >= 0, top_p in (0, 1]; seed -1 (random) or 0..2**63-1.

Precision follows the CLI's `--dtype auto` rule on the serving machine (bf16 autocast on CUDA and
on CPUs with native bf16, fp32 elsewhere), and prompts are encoded as the CLI encodes them
(`<|endoftext|>` written in a prompt is ordinary text), so a greedy request returns what
`gemma3 generate --temperature 0` prints on the same machine.

No generation outlives its request: a deadline (the scoring server's request time limit,
`MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`) and the server's shutdown (SIGTERM to the uvicorn
worker) are checked before every token.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

MAX_PROMPTS = 64
MAX_SEED = 2**63 - 1
# Defaults for every predict(): greedy, like `gemma3 generate --temperature 0`.
DEFAULT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 200,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": -1,
}
INPUT_EXAMPLE = (["Once upon a time"], {"max_new_tokens": 8})


def _bad(field: str, message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"{field}: {message}")


def _prompts(model_input: Any) -> list[str]:
    """The request's prompts as a list of strings (a DataFrame column, a list, or one string)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0].tolist() if model_input.shape[1] else []
    elif isinstance(model_input, (str, dict)):
        model_input = [model_input]
    prompts = list(model_input)
    if len(prompts) > MAX_PROMPTS:
        raise _bad("inputs", f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    if not all(isinstance(p, str) for p in prompts):
        raise _bad("inputs", "every prompt must be a string")
    return prompts


def _sampling(params: dict[str, Any] | None, context_length: int) -> dict[str, Any]:
    """The request's params over the defaults, checked with the CLI's rules."""
    from gemma3.errors import Gemma3Error
    from gemma3.generation import check_sampling

    p = {**DEFAULT_PARAMS, **(params or {})}
    unknown = sorted(set(p) - set(DEFAULT_PARAMS))
    if unknown:
        raise _bad("params", f"unknown {unknown[0]!r}; use {', '.join(DEFAULT_PARAMS)}")
    try:
        p = {k: (float if k in ("temperature", "top_p") else int)(v) for k, v in p.items()}
    except (TypeError, ValueError, OverflowError) as e:
        raise _bad("params", str(e)) from None
    if p["max_new_tokens"] > context_length:
        raise _bad(
            "max_new_tokens",
            f"{p['max_new_tokens']} is more than the model's context_length {context_length}",
        )
    if not (p["seed"] == -1 or 0 <= p["seed"] <= MAX_SEED - MAX_PROMPTS):
        raise _bad("seed", f"must be -1 (random) or 0..{MAX_SEED - MAX_PROMPTS}, got {p['seed']}")
    try:
        check_sampling(
            max_new_tokens=p["max_new_tokens"],
            temperature=p["temperature"],
            top_k=p["top_k"],
            top_p=p["top_p"],
        )
    except Gemma3Error as e:
        field = str(e).split(" ", 1)[0]
        raise _bad(field, str(e)) from None
    return p


def _server_stopping() -> bool:
    """True once the uvicorn worker serving us was told to exit (its SIGTERM handler is the
    server's `handle_exit`, which sets `should_exit`)."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


def _stopper() -> tuple[Callable[[], bool], float]:
    timeout = float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT") or 60)
    deadline = time.monotonic() + timeout

    def should_stop() -> bool:
        return time.monotonic() > deadline or _server_stopping()

    return should_stop, timeout


class Gemma3Model(mlflow.pyfunc.PythonModel):
    """Prompts in, prompt + completion out (what `gemma3 generate` prints)."""

    def load_context(self, context: Any) -> None:
        from gemma3.hf import load_checkpoint
        from gemma3.runtime import resolve_device, resolve_precision, weight_dtype

        self.device = resolve_device("auto", source="serving device")
        self.precision = resolve_precision("auto", self.device)  # `--dtype auto`'s rule
        self.model = load_checkpoint(
            context.artifacts["checkpoint"],
            device=self.device,
            dtype=weight_dtype(self.precision),
        )

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        """`model_input`: prompts (a list of strings; MLflow may hand a one-column DataFrame);
        returns prompt + completion per prompt. No type hints on purpose: MLflow would read them
        as the signature instead of the one logged with the params schema."""
        from gemma3.errors import Gemma3Error
        from gemma3.generation import check_prompts, generate
        from gemma3.runtime import autocast
        from gemma3.tokenizer import EOT_ID, decode, encode

        prompts = _prompts(model_input)
        cfg = self.model.config
        p = _sampling(params, cfg.context_length)
        try:
            ids = check_prompts([encode(x) for x in prompts], cfg)
        except Gemma3Error as e:
            raise _bad("inputs", str(e)) from None
        if not ids:
            return []
        should_stop, timeout = _stopper()
        with autocast(self.precision, self.device):
            new = generate(
                self.model,
                ids,
                p["max_new_tokens"],
                temperature=p["temperature"],
                top_k=p["top_k"] or None,
                top_p=p["top_p"],
                seed=None if p["seed"] == -1 else p["seed"],
                stop_token=EOT_ID,
                should_stop=should_stop,
            )
        if should_stop():
            raise MlflowException(
                f"generation stopped: the server is shutting down or the request's {timeout:g} s "
                "limit passed (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)"
            )
        return [
            x + decode([t for t in n if t != EOT_ID]) for x, n in zip(prompts, new, strict=True)
        ]
