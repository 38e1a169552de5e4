"""DVC stage: one story per prompt in params (sample section) -> samples/samples.md + samples.json."""

import json
from pathlib import Path

from gemma3.errors import run_main
from gemma3.fileio import atomic_write_json, atomic_write_text
from gemma3.generate import generate
from gemma3.hf import load_checkpoint, read_meta
from gemma3.params import load_params
from gemma3.runtime import autocast, resolve_device, resolve_precision, weight_dtype
from gemma3.tokenizer import EOT_ID, decode, encode

CKPT, OUT = Path("checkpoints/best"), Path("samples")


def main() -> None:
    p = load_params()
    s = p.sample
    device = resolve_device(p.train.device)
    precision = resolve_precision(p.train.precision, device)  # the policy training used
    model = load_checkpoint(CKPT, device=device, dtype=weight_dtype(precision))
    ckpt = read_meta(CKPT)
    samples = []
    for i, prompt in enumerate(s.prompts):
        with autocast(precision, device):
            new = generate(
                model,
                [encode(prompt)],
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=s.seed + i,
                stop_token=EOT_ID if s.stop_at_eot else None,
            )[0]
        samples.append(
            {
                "prompt": prompt,
                "completion": decode([t for t in new if t != EOT_ID]),
                "tokens": len(new),
            }
        )

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
