"""The model card (README.md with the Hub's metadata block) and generation_config.json that
checkpoints/best and every `gemma3 export-hf` carry, read back by the Hub's and transformers'
own parsers."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gemma3.params import SampleParams, load_params
from gemma3.train import train
from tests.project import env, write_params, write_tokens
from tests.test_train import paths


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny training run's workspace (its checkpoints/best holds the card)."""
    root = tmp_path_factory.mktemp("card")
    write_params(root, train={"max_steps": 20})
    write_tokens(root)
    train(load_params(root / "params.yaml"), paths(root), progress=False)
    return root


def front_matter(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    block, _, body = text[4:].partition("\n---\n")
    assert "# gemma3-tinystories" in body
    return yaml.safe_load(block)


def best_val_loss(root: Path) -> float:
    """The lowest validation loss the run logged (plots/val.csv), independent of the card code."""
    with open(root / "plots" / "val.csv", encoding="utf-8") as f:
        return min(float(r["val_loss"]) for r in csv.DictReader(f))


def test_checkpoint_card_metadata_parses_and_holds_the_best_val_loss(trained_dir: Path) -> None:
    from huggingface_hub import ModelCard

    card = trained_dir / "checkpoints/best/README.md"
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "datasets" not in meta  # these tokens are not a Hub dataset: the card claims none
    want = best_val_loss(trained_dir)
    (result,) = ModelCard.load(card).data.eval_results  # the Hub library's own parser
    assert result.metric_type == "loss" and result.metric_value == pytest.approx(want, abs=1e-4)
    assert result.dataset_split == "validation"
    text = card.read_text(encoding="utf-8")
    params = yaml.safe_load((trained_dir / "params.yaml").read_text(encoding="utf-8"))["train"]
    for key in ("max_steps", "batch_size", "block_size", "lr"):
        assert f"| `{key}` | {params[key]} |" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "load_checkpoint(" in text


def test_hub_data_is_named_in_the_card() -> None:
    import torch

    from gemma3.config import Config
    from gemma3.hf import model_card

    source = {"source": "hub", "repo_id": "roneneldan/TinyStories", "commit": "7dfb18bd" * 5}
    text = model_card(Config.from_name("gemma3-tiny"), {"data": {"source": source}}, torch.float32)
    assert yaml.safe_load(text.split("---\n")[1])["datasets"] == ["roneneldan/TinyStories"]
    assert "model-index" not in text  # no validation loss known: no result claimed


def test_generation_config_has_the_sampling_defaults_and_transformers_loads(trained_dir) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    best = trained_dir / "checkpoints/best"
    gen = GenerationConfig.from_pretrained(best)
    sample = SampleParams()  # params.yaml's sample section (test_engine_layout holds them equal)
    assert gen.do_sample is True
    assert (gen.temperature, gen.top_k, gen.top_p) == (
        sample.temperature,
        sample.top_k,
        sample.top_p,
    )
    assert gen.max_new_tokens == sample.max_new_tokens
    assert gen.eos_token_id == gen.bos_token_id == gen.pad_token_id == 50256
    model = AutoModelForCausalLM.from_pretrained(best)
    assert model.generation_config.temperature == sample.temperature


def test_export_carries_the_card_and_generation_config(trained_dir: Path, tmp_path) -> None:
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "gemma3.cli", "export-hf", "--model", "checkpoints/best",
         "--out", str(out), "--dtype", "bf16"],
        cwd=trained_dir, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = front_matter(out / "README.md")
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == pytest.approx(best_val_loss(trained_dir), abs=1e-4)
    assert "bfloat16" in (out / "README.md").read_text(encoding="utf-8")
    gen = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    src = json.loads((trained_dir / "checkpoints/best/generation_config.json").read_text())
    assert gen == src


def test_card_is_replaced_with_the_checkpoint_or_not_at_all(tmp_path, monkeypatch) -> None:
    """A save that fails after writing the new card leaves the old checkpoint, card included."""
    import torch

    import gemma3.hf as hf
    from gemma3.config import Config
    from gemma3.model import Gemma3ForCausalLM

    model = Gemma3ForCausalLM(Config.from_name("gemma3-tiny"))
    best = hf.save_checkpoint(model, tmp_path / "best", meta={"step": 1, "val_loss": 5.0})
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    real = hf.atomic_write_json

    def fail_on_meta(path, obj):
        if Path(path).name == hf.META:  # the last file of the checkpoint
            raise OSError(28, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(hf, "atomic_write_json", fail_on_meta)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError):
        hf.save_checkpoint(model, best, meta={"step": 2, "val_loss": 4.0})
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert "5.0" in (best / "README.md").read_text(encoding="utf-8")


def test_sampling_defaults_are_the_sample_sections() -> None:
    from gemma3.hf import SAMPLING

    sample = dataclasses.asdict(SampleParams())
    assert SAMPLING == {k: sample[k] for k in SAMPLING}
