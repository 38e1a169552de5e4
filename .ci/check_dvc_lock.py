"""Fail when dvc.lock does not match the code and params on this commit.

On a fresh clone outputs are simply absent ("deleted"/"not in cache"); what must never happen is a
code dependency or a param that changed since dvc.lock was written, because then the committed
lock no longer describes how the committed results were produced.
"""

from __future__ import annotations

import json
import subprocess
import sys


def main() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        print(f"dvc status failed: {out.stderr.strip()}", file=sys.stderr)
        return 1
    stale = []
    for stage, changes in json.loads(out.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                if (
                    state in ("modified", "new")
                    and not path.startswith("data/")
                    and not path.startswith("checkpoints/")
                ):
                    stale.append(f"{stage}: dep {path} {state}")
            for path, state in change.get("changed params", {}).items():
                stale.append(f"{stage}: params {path} {state}")
    if stale:
        print("dvc.lock is stale (re-run `make run` and commit dvc.lock):", file=sys.stderr)
        for s in stale:
            print(f"  {s}", file=sys.stderr)
        return 1
    print("dvc.lock matches code and params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
