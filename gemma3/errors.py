"""One exception type for problems a user can fix, and a wrapper that prints it in one line.

Library code raises `Gemma3Error` with a message that names the file, the field and the fix.
Entry points (stage scripts, the CLI) wrap their `main` with `run_main`, so the user sees
`error: <message>` on stderr and a non-zero exit instead of a traceback. Set GEMMA3_DEBUG=1
to get the traceback back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# Top-level modules of the `pipeline` extra: the library (load, generate, export) runs without them.
PIPELINE_MODULES = frozenset(
    {"yaml", "tqdm", "datasets", "huggingface_hub", "pandas", "pyarrow", "dvc", "mlflow"}
    | {"transformers", "httpx2"}
)
INSTALL_PIPELINE = (
    "pip install 'gemma3-tinystories[pipeline]' (in a clone: pip install -e '.[pipeline]')"
)


class Gemma3Error(Exception):
    """An error caused by input the user can fix (params, files, flags). Message is one line."""

    exit_code = EXIT_USER_ERROR


class Gemma3EnvironmentError(Gemma3Error):
    """A one-line error that is not the input's fault (a full disk, a peer process that died):
    exit 1 like an OSError, but with a message that says what to do."""

    exit_code = 1


def missing_extra(e: ModuleNotFoundError) -> Gemma3Error | None:
    """A one-line error for a module of the `pipeline` extra that is not installed, else None."""
    module = (e.name or "").split(".")[0]
    if module not in PIPELINE_MODULES:
        return None
    package = {"yaml": "pyyaml"}.get(module, module)  # the name pip knows
    return Gemma3Error(
        f"this needs the '{package}' package of the pipeline extra, which is not installed: "
        + INSTALL_PIPELINE
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_main(main: Callable[[], int | None], prog: str | None = None) -> NoReturn:
    """Run `main` and exit; user errors become one stderr line, tracebacks need GEMMA3_DEBUG=1."""
    debug = os.environ.get("GEMMA3_DEBUG", "") not in ("", "0")
    name = prog or os.path.basename(sys.argv[0] or "gemma3")
    try:
        try:
            code = main()
        except ModuleNotFoundError as e:  # a library-only install running a pipeline command
            raise missing_extra(e) or e from None
    except Gemma3Error as e:
        if debug:
            raise
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        if debug:
            raise
        detail = f": {_one_line(e)}" if str(e) else ""
        print(f"{name}: interrupted{detail}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (OSError, MemoryError) as e:
        # Disk full, permission denied, out of memory: not a bug in our code, so no traceback.
        if debug:
            raise
        print(f"{name}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(int(code or 0))
