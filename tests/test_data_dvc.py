"""Data stages as a user runs them: real `dvc` in a temp git repo, local sources as dependencies,
`tokenize.eot: false` and bad data params through the stages, no absolute paths in cached outputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.dvcrepo import make_repo, sh, tool_env

pytestmark = pytest.mark.slow

STORIES = [f"Story {i}: a cat named Tom {i % 3} saw a ball." for i in range(30)]


def write_txt(path: Path, stories: list[str]) -> None:
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")


def lock_outs(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def env_without_home(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return tool_env(HOME=str(home), HF_HOME=str(tmp_path / "hf"))


LOCAL = {"data": {"source": "data/source/stories.txt", "val_fraction": 0.2}}


def test_editing_a_local_source_reruns_download_and_clones_agree(tmp_path: Path) -> None:
    env = env_without_home(tmp_path)
    a = make_repo(tmp_path / "a", LOCAL)
    write_txt(a / "data/source/stories.txt", STORIES)
    out = sh(["dvc", "repro", "tokenize"], a, env).stdout
    assert "Running stage 'download'" in out and "Running stage 'tokenize'" in out
    first = lock_outs(a, "download")["data/raw"]
    source = json.loads((a / "data/raw/source.json").read_text(encoding="utf-8"))
    assert source["path"] == "data/source/stories.txt"
    assert str(tmp_path) not in (a / "data/raw/source.json").read_text(encoding="utf-8")
    assert json.loads(sh(["dvc", "status", "--json", "download"], a, env).stdout) == {}

    # Edit the file: dvc status names the stage and the changed dependency; repro redoes it
    # (without -f) and everything after it.
    write_txt(a / "data/source/stories.txt", STORIES + ["One more story about a dog."])
    status = sh(["dvc", "status", "--json", "--with-deps", "tokenize"], a, env).stdout
    assert json.loads(status).get("download") == [{"changed deps": {"data/source": "modified"}}]
    out = sh(["dvc", "repro", "tokenize"], a, env).stdout
    assert "Running stage 'download'" in out and "Running stage 'tokenize'" in out
    assert lock_outs(a, "download")["data/raw"] != first
    raw = [json.loads(x)["text"] for x in (a / "data/raw/train.jsonl").read_text().splitlines()]
    raw += [
        json.loads(x)["text"] for x in (a / "data/raw/validation.jsonl").read_text().splitlines()
    ]
    assert sorted(raw) == sorted(STORIES + ["One more story about a dog."])

    # Tracked with `dvc add`, the file itself is named by dvc status too.
    sh(["dvc", "add", "data/source/stories.txt"], a, env)
    sh(["dvc", "repro", "tokenize"], a, env)
    write_txt(a / "data/source/stories.txt", STORIES)
    status = json.loads(sh(["dvc", "status", "--json"], a, env).stdout)
    assert status["data/source/stories.txt.dvc"] == [
        {"changed outs": {"data/source/stories.txt": "modified"}}
    ]
    assert "download" in status
    sh(["dvc", "repro", "tokenize"], a, env)
    assert lock_outs(a, "download")["data/raw"] == first  # the same bytes, the same hash

    # A second clone elsewhere with the same file: the same data/raw and data/tokens hashes.
    b = make_repo(tmp_path / "elsewhere" / "b", LOCAL)
    write_txt(b / "data/source/stories.txt", STORIES)
    sh(["dvc", "repro", "tokenize"], b, env)
    assert lock_outs(b, "download") == lock_outs(a, "download")
    assert lock_outs(b, "tokenize") == lock_outs(a, "tokenize")
    assert list((tmp_path / "home").iterdir()) == []  # no datasets/HF cache in the user's home


def test_eot_false_and_bad_data_params_through_the_stages(tmp_path: Path) -> None:
    env = env_without_home(tmp_path)
    repo = make_repo(tmp_path / "r", {"tokenize": {"eot": False}})
    out = sh(["dvc", "repro", "tokenize"], repo, env).stdout
    assert "no end-of-text tokens" in out
    tokens = np.fromfile(repo / "data/tokens/train.bin", dtype=np.uint16)
    assert 50256 not in tokens and len(tokens) > 1000
    meta = json.loads((repo / "data/tokens/meta.json").read_text(encoding="utf-8"))
    assert meta["eot"] is False and meta["train"]["tokens"] == len(tokens)
    before = (repo / "data/tokens/train.bin").read_bytes()

    # Each data-stage param is checked before any work: one line on stderr, exit 2 (the stage
    # that reads the section; one case also through dvc repro).
    bad = [
        ("tokenize.num_proc", 0, "tokenize.num_proc: must be > 0"),
        ("tokenize.num_proc", 1000, "tokenize.num_proc: must be at most 256"),
        ("tokenize.batch_stories", 0, "tokenize.batch_stories: must be > 0"),
        ("tokenize.eot", "maybe", "tokenize.eot: must be true/false"),
        ("data.val_fraction", 1.5, "data.val_fraction: must be between 0 and 1"),
        ("data.synthetic.n_train", 0, "data.synthetic.n_train: must be > 0"),
        ("data.hub.repo_id", "../../etc", "data.hub.repo_id: must look like owner/name"),
        ("data.hub.revision", "a..b", "data.hub.revision: must be a commit, branch or tag"),
        ("data.hub.verify", 1, "data.hub.verify: must be true/false"),
        ("data.source", " ", "data.source: must name"),
    ]
    good = (repo / "params.yaml").read_text(encoding="utf-8")
    for key, value, message in bad:
        params = yaml.safe_load(good)
        *parents, leaf = key.split(".")
        section = params
        for k in parents:
            section = section[k]
        section[leaf] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
        for stage in [key.split(".")[0].replace("data", "download")]:
            proc = sh([sys.executable, "-m", f"stages.{stage}"], repo, env, check=False)
            assert proc.returncode == 2, (key, stage, proc.stderr[-2000:])
            assert proc.stderr.strip() == f"{stage}: error: params.yaml: {message}" or (
                proc.stderr.count("\n") == 1 and message in proc.stderr
            ), (key, proc.stderr)
        if key == "tokenize.num_proc" and value == 0:
            proc = sh(["dvc", "repro", "tokenize"], repo, env, check=False)
            assert proc.returncode != 0 and message in proc.stderr
            assert "Traceback" not in proc.stderr
    (repo / "params.yaml").write_text(good, encoding="utf-8")
    sh(["dvc", "repro", "tokenize"], repo, env)
    assert (repo / "data/tokens/train.bin").read_bytes() == before
    assert os.listdir(tmp_path / "home") == []
