"""The `gemma3` command: model info, generation, HF export, recipes, the MLflow leaderboard.

Each subcommand is a function `cmd_<name>(args) -> int`; `main` wires them to argparse and runs
them through `run_main`, so user errors print one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from gemma3.errors import run_main

if TYPE_CHECKING:
    import torch


MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
DTYPE_CHOICES = ("fp32", "bf16", "float32", "bfloat16")  # gemma3.hf.DTYPES, without importing torch


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
            f"{cfg.n_kv_heads} kv x {cfg.head_dim}",
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


def _dtype(name: str) -> torch.dtype:
    from gemma3.errors import Gemma3Error
    from gemma3.hf import DTYPES

    if name not in DTYPES:
        raise Gemma3Error(f"--dtype: {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _generation_precision(args: argparse.Namespace) -> tuple[torch.device, str]:
    """--dtype auto follows training's precision policy (bf16 autocast where the hardware has
    bf16, fp32 elsewhere), as the sample stage does; fp32/bf16 pin the weights' dtype."""
    from gemma3.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device, source="--device")
    if args.dtype == "auto":
        return device, resolve_precision("auto", device)
    if args.dtype == "int8":
        from gemma3.quant import check_int8_device

        check_int8_device(device, "--dtype int8")
        return device, "int8"
    return device, "bf16-pure" if _dtype(args.dtype) != _dtype("fp32") else "fp32"


class _Streamer:
    """Write text as tokens arrive; tokens that end inside a UTF-8 character wait for the rest."""

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO, skip: int) -> None:
        self.decode, self.out, self.skip = decode, out, skip
        self.pending: list[int] = []

    def __call__(self, step: list[int | None]) -> None:
        t = step[0]
        if t is None or t == self.skip:
            return
        self.pending.append(t)
        text = self.decode(self.pending)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self.decode(self.pending) + "\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.pending = []


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from gemma3.errors import Gemma3Error
    from gemma3.generation import check_prompts, check_sampling, generate
    from gemma3.hf import load_checkpoint
    from gemma3.runtime import autocast, weight_dtype
    from gemma3.tokenizer import EOT_ID, decode, encode

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (Ctrl-D to end)...", file=sys.stderr)
        prompt = sys.stdin.read().rstrip("\n")
    check_sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    if args.num_samples < 1:
        raise Gemma3Error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED - args.num_samples:
        raise Gemma3Error(
            f"--seed must be between 0 and {MAX_SEED - args.num_samples}, got {args.seed}"
        )
    device, precision = _generation_precision(args)
    int8 = precision == "int8"
    model = load_checkpoint(
        args.model, device=device, dtype=weight_dtype("fp32" if int8 else precision)
    )
    if int8:
        from gemma3.quant import quantize_int8

        model = quantize_int8(model, inplace=True)  # computed here, from the float checkpoint
    ids = check_prompts([encode(prompt)], model.config)[0]  # before anything is printed
    room = model.config.context_length - len(ids)
    if args.max_new_tokens > room:
        print(
            f"--max-new-tokens {args.max_new_tokens} capped at {room}: the prompt's "
            f"{len(ids)} tokens + {room} new fill the model's context of "
            f"{model.config.context_length}",
            file=sys.stderr,
        )
    total_new, total_s = 0, 0.0
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        streamer = _Streamer(decode, sys.stdout, skip=EOT_ID)
        t0 = time.perf_counter()
        with autocast(precision, device):
            new = generate(
                model,
                [ids],
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k or None,
                top_p=args.top_p,
                seed=None if args.seed is None else args.seed + i,
                stop_token=None if args.no_stop else EOT_ID,
                on_step=streamer,
            )[0]
        total_s += time.perf_counter() - t0
        total_new += len(new)
        streamer.finish()
    rate = total_new / total_s if total_s > 0 else 0.0
    print(
        f"[{total_new} tokens in {total_s:.2f} s, {rate:.1f} tokens/s on {device}, {precision}]",
        file=sys.stderr,
    )
    return 0


# What `export-hf` writes (save_checkpoint's files): a directory holding only these, with our meta
# file marking it as an export, is a previous export that may be replaced.
EXPORT_FILES = frozenset(
    {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "gemma3.json",
        "README.md",
    }
)
EXPORT_MARK = "exported_from"


def _check_export_target(src: Path, dst: Path) -> None:
    """Refuse any --out whose replacement could destroy something export-hf did not write."""
    import hashlib

    from gemma3.errors import Gemma3Error
    from gemma3.fileio import load_json_object
    from gemma3.hf import CARD, META

    if dst == src or src.is_relative_to(dst):
        raise Gemma3Error(
            f"--out {dst}: contains the checkpoint --model {src}; choose a new directory"
        )
    if dst.is_relative_to(src):
        raise Gemma3Error(
            f"--out {dst}: is inside the checkpoint --model {src}; choose a new directory"
        )
    if dst.exists() and not dst.is_dir():
        raise Gemma3Error(f"--out {dst}: exists and is not a directory; choose a new directory")
    if not dst.exists() or not any(dst.iterdir()):
        return
    foreign = sorted(p.name for p in dst.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
    meta: dict = {}
    try:  # only a regular gemma3.json is read (a FIFO there would block): it is in `foreign`
        if not foreign:
            meta = load_json_object(dst / META)
    except (OSError, Gemma3Error):
        pass
    marked = EXPORT_MARK in meta
    card = dst / CARD
    if card.is_file() and hashlib.sha256(card.read_bytes()).hexdigest() != meta.get("card_sha256"):
        foreign = sorted([*foreign, CARD])  # the model card, edited since the export
    if foreign or not marked:
        what = f"holds {foreign[0]!r}" if foreign else "was not written by gemma3 export-hf"
        raise Gemma3Error(
            f"--out {dst}: not empty and {what}; export-hf only replaces its own previous "
            "exports: choose a new or empty directory"
        )


def cmd_export_hf(args: argparse.Namespace) -> int:
    from gemma3.hf import load_checkpoint, read_meta, save_checkpoint

    dtype = _dtype(args.dtype)
    src, dst = Path(args.model).resolve(), Path(args.out).resolve()
    _check_export_target(src, dst)
    model = load_checkpoint(src)
    meta = {k: v for k, v in read_meta(src).items() if k not in ("preset", "config")}
    save_checkpoint(model, dst, dtype=dtype, meta={**meta, EXPORT_MARK: str(src)})
    print(f"exported {src} -> {dst} ({args.dtype}); load with transformers:")
    print(f"  AutoModelForCausalLM.from_pretrained({str(dst)!r})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from gemma3.tracking import leaderboard

    print(leaderboard(experiment=args.experiment, limit=args.limit))
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from gemma3.errors import Gemma3Error
    from gemma3.recipes import available, command, dvc_set_args, load_recipe

    if args.name is None:
        print("\n".join(available()))
        return 0
    if args.command_line:
        print(command(args.name))
    else:
        # Plain words, so that `dvc exp run $(gemma3 recipe NAME)` works: the shell does not
        # remove quotes from a command substitution, so quoting here would reach dvc verbatim.
        words = dvc_set_args(load_recipe(args.name))
        bad = [w for w in words if any(c.isspace() or c in "'\"*?[" for c in w)]
        if bad:
            raise Gemma3Error(
                f"recipe {args.name!r} has values that need quoting ({bad[0]}); use "
                f'eval "$(gemma3 recipe {args.name} --command)"'
            )
        print(" ".join(words))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (plus where to look), not the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each option's default and keep the examples' line breaks."""


def _version() -> str:
    from gemma3 import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gemma3",
        description=__doc__.splitlines()[0],
        epilog="Run `gemma3 COMMAND --help` for a command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(
        name: str, help: str, examples: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog="examples:\n" + examples,
            formatter_class=_Help,
        )

    _add_model_commands(add)
    _add_project_commands(add)
    return p


AddCommand = Callable[..., argparse.ArgumentParser]


def _add_model_commands(add: AddCommand) -> None:
    """info, generate, export-hf: commands about a preset or a checkpoint."""
    from gemma3.config import PRESETS

    info = add(
        "info",
        "print a preset's parameter breakdown",
        "  gemma3 info\n  gemma3 info --preset gemma3-tiny",
    )
    info.add_argument("--preset", default="gemma3-270m", help=f"one of: {', '.join(PRESETS)}")
    info.set_defaults(func=cmd_info)

    gen = add(
        "generate",
        "stream a story from a checkpoint directory",
        '  gemma3 generate "Once upon a time"\n'
        '  gemma3 generate "Once upon a time" --temperature 0 --max-new-tokens 50\n'
        '  echo "The dog was sad because" | gemma3 generate --num-samples 3 --seed 1',
        description="Stream a continuation of PROMPT (or of stdin) from a checkpoint directory.",
    )
    gen.add_argument("prompt", nargs="?", help="the story's beginning; read from stdin if omitted")
    gen.add_argument("--model", default="checkpoints/best", help="checkpoint directory")
    gen.add_argument(
        "--max-new-tokens", type=int, default=200, help="capped at what the context leaves"
    )
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=200, help="0 = off")
    gen.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    gen.add_argument(
        "--seed", type=int, default=None, help=f"0..{MAX_SEED}; fix for repeatable samples"
    )
    gen.add_argument("--num-samples", type=int, default=1, help="stories to generate")
    gen.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_CHOICES, "int8"),
        help="auto = training's precision policy (bf16 autocast on CUDA and on CPUs with native "
        "bf16, else fp32); fp32/bf16 = weights in that dtype; int8 = int8 linear layers computed "
        "from the checkpoint at load (CPU only)",
    )
    gen.set_defaults(func=cmd_generate)

    exp = add(
        "export-hf",
        "write a checkpoint as a transformers-loadable directory",
        "  gemma3 export-hf --out exports/gemma3-hf\n"
        "  gemma3 export-hf --model checkpoints/best --out exports/gemma3-bf16 --dtype bf16",
    )
    exp.add_argument("--model", default="checkpoints/best", help="checkpoint directory")
    exp.add_argument(
        "--out",
        required=True,
        default=argparse.SUPPRESS,  # no "(default: None)" in the help of a required option
        help="a new or empty directory, or a previous export (replaced atomically); "
        "anything else is refused",
    )
    exp.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="stored dtype")
    exp.set_defaults(func=cmd_export_hf)


def _add_project_commands(add: AddCommand) -> None:
    """recipe, runs: commands about the pipeline's experiments."""
    rec = add(
        "recipe",
        "print a named recipe as dvc exp run -S arguments",
        "  gemma3 recipe\n  dvc exp run $(gemma3 recipe seed-270m)\n"
        "  gemma3 recipe seed-270m --command",
    )
    rec.add_argument("name", nargs="?", help="recipe name; omit to list them")
    rec.add_argument(
        "--command", dest="command_line", action="store_true", help="print the whole command"
    )
    rec.set_defaults(func=cmd_recipe)

    runs = add(
        "runs",
        "list MLflow runs as a leaderboard, best eval loss first",
        "  gemma3 runs\n  MLFLOW_TRACKING_URI=http://team-server:5000 gemma3 runs --limit 20",
        description="List MLflow runs as a leaderboard, best eval loss first: run name, the "
        "params that differ between runs, best val loss, eval loss, tokens/s. Reads "
        "MLFLOW_TRACKING_URI, else this project's mlflow.db.",
    )
    runs.add_argument("--experiment", default=None, help="default: params.yaml tracking.experiment")
    runs.add_argument("--limit", type=int, default=50, help="most runs shown")
    runs.set_defaults(func=cmd_runs)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_main(lambda: args.func(args), prog="gemma3")


if __name__ == "__main__":
    main(sys.argv[1:])
