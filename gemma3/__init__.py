"""Gemma 3 (the 270M architecture) from scratch in PyTorch, trained on TinyStories.

The library needs only torch, numpy, tiktoken and safetensors:

    from gemma3 import load_checkpoint, generate
    from gemma3.tokenizer import encode, decode

    model = load_checkpoint("checkpoints/best")
    out = generate(model, [encode("Once upon a time")], 50, temperature=0)
    print(decode(out[0]))

The names below are imported on first use, so `import gemma3` (and `gemma3 --version`) does not
load torch. The DVC + MLflow pipeline needs the `pipeline` extra.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

# public name -> the module that defines it
_PUBLIC = {
    "Config": "gemma3.config",
    "PRESETS": "gemma3.config",
    "Gemma3ForCausalLM": "gemma3.model",
    "load_checkpoint": "gemma3.hf",
    "save_checkpoint": "gemma3.hf",
    "generate": "gemma3.generation",
}
__all__ = [
    "PRESETS",
    "Config",
    "Gemma3ForCausalLM",
    "__version__",
    "generate",
    "load_checkpoint",
    "save_checkpoint",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports on first use
    from gemma3.config import PRESETS, Config
    from gemma3.generation import generate
    from gemma3.hf import load_checkpoint, save_checkpoint
    from gemma3.model import Gemma3ForCausalLM


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's module when the name is first used."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gemma3' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
