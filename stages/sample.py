"""DVC stage: one story per prompt in params (sample section) -> samples/samples.md + samples.json."""

import json
from pathlib import Path

from gemma3.errors import run_main
from gemma3.fileio import atomic_write_json, atomic_write_text
from gemma3.generation import generate
from gemma3.hf import load_checkpoint, read_meta
from gemma3.params import load_params
from gemma3.quant import check_int8_device, quantize_int8
from gemma3.runtime import autocast, resolve_device, resolve_precision, weight_dtype
from gemma3.tokenizer import EOT_ID, decode, encode

CKPT, OUT = Path("checkpoints/best"), Path("samples")


def main() -> None:
    p = load_params()
    s = p.sample
    device = resolve_device(p.train.device)
    if s.dtype == "int8":
        check_int8_device(device, "params.yaml: sample.dtype")
    if s.dtype == "auto":
        precision = resolve_precision(p.train.precision, device)  # the policy training used
    else:
        precision = "bf16-pure" if s.dtype == "bf16" else "fp32"
    model = load_checkpoint(CKPT, device=device, dtype=weight_dtype(precision))
    if s.dtype == "int8":
        model = quantize_int8(model, inplace=True)
    ckpt = read_meta(CKPT)
    # One batch: row i samples from its own generator seeded with sample.seed + i, so each story
    # is the one its prompt gives alone with that seed.
    with autocast(precision, device):
        stories = generate(
            model,
            [encode(prompt) for prompt in s.prompts],
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            stop_token=EOT_ID if s.stop_at_eot else None,
        )
    samples = [
        {
            "prompt": prompt,
            "completion": decode([t for t in new if t != EOT_ID]),
            "tokens": len(new),
        }
        for prompt, new in zip(s.prompts, stories, strict=True)
    ]

    lines = [
        "# Samples",
        "",
        f"Checkpoint step {ckpt.get('step')}, val loss {ckpt.get('val_loss', float('nan')):.4f}; "
        f"temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}, seed {s.seed}.",
        "",
    ]
    for i, sm in enumerate(samples, 1):
        lines += [f"## {i}. {sm['prompt']}", "", f"**{sm['prompt']}**{sm['completion']}", ""]
    atomic_write_text(OUT / "samples.md", "\n".join(lines))
    atomic_write_json(
        OUT / "samples.json",
        {
            "checkpoint_step": ckpt.get("step"),
            "params": json.loads(json.dumps(p.to_dict()["sample"])),
            "samples": samples,
        },
    )

    from gemma3.tracking import start_run

    with start_run(
        enabled=p.tracking.enabled,
        experiment=p.tracking.experiment,
        run_id=ckpt.get("mlflow_run_id"),
    ) as tracker:
        tracker.log_artifact(OUT / "samples.md", "samples")
        tracker.log_artifact(OUT / "samples.json", "samples")
    print(f"sample: {len(samples)} stories -> {OUT / 'samples.md'}")


if __name__ == "__main__":
    run_main(main, prog="sample")
