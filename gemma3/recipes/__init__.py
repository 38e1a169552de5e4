"""Named recipes: sets of params.yaml overrides, expanded into `dvc exp run -S key=value` args.

A recipe is a flat YAML mapping of dotted params keys to values, so it reads like the `-S` flags
it becomes, and the effective params can be checked without training anything.
"""

from __future__ import annotations

import copy
import json
import shlex
from importlib import resources
from typing import Any

import yaml

from gemma3.errors import Gemma3Error


def available() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files(__name__).iterdir()
        if p.name.endswith(".yaml")
    )


def load_recipe(name: str) -> dict[str, Any]:
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        raise Gemma3Error(f"unknown recipe {name!r}; available: {', '.join(available())}")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(recipe, dict):
            raise Gemma3Error(f"recipe {name!r}: must be a mapping of dotted params keys")
        return {
            k: (yaml.safe_load(v) if isinstance(v, str) and v.startswith("{") else v)
            for k, v in recipe.items()
        }
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise Gemma3Error(f"recipe {name!r}: not valid YAML ({what})") from None


def _hydra_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def dvc_set_args(recipe: dict[str, Any]) -> list[str]:
    """`-S key=value` pairs for `dvc exp run` (Hydra override syntax)."""
    args: list[str] = []
    for key, value in recipe.items():
        args += ["-S", f"{key}={_hydra_value(value)}"]
    return args


def apply(params: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """params.yaml content with the recipe's dotted keys set (what `dvc exp run -S` writes)."""
    out = copy.deepcopy(params)
    for key, value in recipe.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def command(name: str) -> str:
    return shlex.join(["dvc", "exp", "run", "-n", name, *dvc_set_args(load_recipe(name))])
