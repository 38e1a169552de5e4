"""README "When something goes wrong": every row of its error table names the tests that check
it, and each named test exists (a renamed or deleted test fails here, not silently)."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest

from tests.project import REPO

REF = re.compile(r"`(test_\w+)(?:::(test_\w+))?(?:\[([\w.-]+)\])?`")


def error_table_rows() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## When something goes wrong", 1)[1].split("\n## ", 1)[0]
    # The error table is the one whose header starts with "message".
    table = section.split("| message (stderr) |", 1)[1].split("\n\n", 1)[0]
    return [ln for ln in table.splitlines()[2:] if ln.startswith("|")]


def param_ids(fn: Any) -> set[str]:
    """The ids pytest gives the parametrized cases of `fn` (explicit ids, else string values)."""
    ids: set[str] = set()
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        for value in mark.args[1]:
            if hasattr(value, "id") and value.id:
                ids.add(value.id)
            elif isinstance(value, str):
                ids.add(value)
    return ids


def resolve(module_name: str, function: str | None, case: str | None) -> bool:
    module = importlib.import_module(f"tests.{module_name}")
    tests = {n: f for n, f in vars(module).items() if n.startswith("test_") and callable(f)}
    if function is not None:
        if function not in tests:
            return False
        tests = {function: tests[function]}
    return case is None or any(case in param_ids(f) for f in tests.values())


def test_error_table_is_the_one_in_the_readme() -> None:
    rows = error_table_rows()
    assert len(rows) >= 30, rows  # the table, not a stray line
    assert all(row.count(" | ") >= 2 for row in rows), rows


@pytest.mark.parametrize("row", error_table_rows(), ids=lambda r: r.split("`")[1][:60])
def test_each_error_row_names_tests_that_exist(row: str) -> None:
    refs = REF.findall(row.rsplit(" | ", 1)[1])
    assert refs, f"row names no test in its last column: {row}"
    missing = [
        f"{m}{'::' + f if f else ''}{'[' + c + ']' if c else ''}"
        for m, f, c in refs
        if not resolve(m, f or None, c or None)
    ]
    assert not missing, f"tests named in README that do not exist: {missing}"
