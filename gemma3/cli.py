"""The `gemma3` command: model info, generation, HF export.

Each subcommand is a function `cmd_<name>(args) -> int`; `main` wires them to argparse and runs
them through `run_main`, so user errors print one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gemma3.errors import run_main


def cmd_info(args: argparse.Namespace) -> int:
    from gemma3.config import PRESETS, Config

    cfg = Config.from_name(args.preset)
    c = cfg.param_counts()
    rows = [
        ("preset", cfg.name),
        (
            "layers",
            f"{cfg.n_layers} ({cfg.layer_types.count('sliding_attention')} sliding, "
            f"{cfg.layer_types.count('full_attention')} full; window {cfg.sliding_window})",
        ),
        (
            "emb / hidden / heads",
            f"{cfg.emb_dim} / {cfg.hidden_dim} / {cfg.n_heads} q, "
            f"{cfg.n_kv_groups} kv x {cfg.head_dim}",
        ),
        ("vocab / context", f"{cfg.vocab_size:,} / {cfg.context_length:,}"),
        ("embedding", f"{c['embedding']:,}"),
        ("non-embedding", f"{c['non_embedding']:,}"),
        ("lm head", f"{c['embedding']:,} (untied) / 0 (tied)"),
        ("total untied", f"{c['total_untied']:,}"),
        ("total tied", f"{c['total_tied']:,}"),
        ("this preset", f"{c['total']:,} ({'tied' if cfg.tie_embeddings else 'untied'})"),
        ("train FLOPs/token @128", f"{cfg.flops_per_token(128) / 1e9:.3f} GFLOP"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.preset not in PRESETS:  # pragma: no cover - from_name already rejected it
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gemma3.config import PRESETS

    p = argparse.ArgumentParser(prog="gemma3", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a preset's parameter breakdown")
    info.add_argument("--preset", default="gemma3-270m", help=f"one of: {', '.join(PRESETS)}")
    info.set_defaults(func=cmd_info)

    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_main(lambda: args.func(args), prog="gemma3")


if __name__ == "__main__":
    main(sys.argv[1:])
