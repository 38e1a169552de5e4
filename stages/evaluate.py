"""DVC stage: loss, perplexity and bits per byte of checkpoints/best over the WHOLE validation split."""

from pathlib import Path

from gemma3.data.tokens import load_tokens, read_tokens_meta
from gemma3.errors import run_main
from gemma3.evaluate import bits_per_byte, evaluate_tokens
from gemma3.fileio import atomic_write_json
from gemma3.hf import load_checkpoint, read_meta
from gemma3.params import load_params
from gemma3.runtime import resolve_device, resolve_precision, weight_dtype

CKPT, TOKENS, OUT = Path("checkpoints/best"), Path("data/tokens"), Path("metrics/eval.json")


def main() -> None:
    p = load_params()
    device = resolve_device(p.train.device)
    precision = resolve_precision(p.train.precision, device)  # the policy training used
    model = load_checkpoint(CKPT, device=device, dtype=weight_dtype(precision))
    ckpt = read_meta(CKPT)
    block = p.eval.block_size or p.train.block_size
    data = load_tokens(TOKENS / "validation.bin", vocab_size=model.config.vocab_size, min_tokens=2)
    meta = read_tokens_meta(TOKENS)
    res = evaluate_tokens(
        model,
        data,
        block_size=block,
        batch_size=p.eval.batch_size,
        device=device,
        precision=precision,
    )
    n_bytes = (meta.get("validation") or {}).get("bytes")  # absent in hand-made token dirs
    bpb = bits_per_byte(res["loss"], res["tokens"], n_bytes) if n_bytes else None
    metrics = {
        "loss": round(res["loss"], 5),
        "perplexity": round(res["perplexity"], 4),
        "bits_per_byte": None if bpb is None else round(bpb, 5),
        "tokens": res["tokens"],
        "block_size": block,
        "checkpoint_step": ckpt.get("step"),
    }
    # Namespaced: `dvc exp show` reads eval.loss, eval.perplexity, ... (the MLflow run id is in
    # metrics/train.json only).
    atomic_write_json(OUT, {"eval": metrics})

    from gemma3.tracking import start_run

    with start_run(
        enabled=p.tracking.enabled,
        experiment=p.tracking.experiment,
        run_id=ckpt.get("mlflow_run_id"),
    ) as tracker:
        step = ckpt.get("step") or 0
        tracker.log_metrics(
            {
                "eval/loss": res["loss"],
                "eval/perplexity": res["perplexity"],
                "eval/bits_per_byte": bpb,
            },
            step=step,
        )
        tracker.set_tags({"eval.block_size": str(block), "eval.tokens": str(res["tokens"])})
    print(
        f"evaluate: loss {metrics['loss']} ppl {metrics['perplexity']} bpb {metrics['bits_per_byte']}"
    )


if __name__ == "__main__":
    run_main(main, prog="evaluate")
