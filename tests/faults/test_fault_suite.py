"""The fault-injection suite (tests/faults/cases.py): every case must end clean. Outcomes are tallied
at the end of the session (tests/conftest.py): clean, traceback, hang, silent, lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.cases import ALL
from tests.faults.harness import Case, run_case
from tests.faults.outcomes import FAULT_OUTCOME, OUTCOMES
from tests.faults.world import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def marks(case: Case) -> list:
    # The cases that launch runs (~1 min together on a quiet machine, tests/launches.py) are `slow`:
    # `make test-fast` skips them; the table in this process (~25 s) always runs.
    return [pytest.mark.slow] if case.slow else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=marks(c)) for c in ALL])
def test_fault_ends_clean(case: Case, world: World, tmp_path: Path, capfd, record_property):
    verdict = run_case(case, world, tmp_path, capfd)
    record_property(FAULT_OUTCOME, (case.name, verdict.outcome))  # tallied by tests/conftest.py
    assert verdict.outcome in OUTCOMES
    assert verdict.outcome == "clean", f"{case.name} ({case.kind}): {verdict.outcome}\n{verdict.detail}"


def test_the_table_covers_every_kind_of_fault():
    names = [case.name for case in ALL]
    assert len(names) == len(set(names)) >= 60
    kinds = {case.kind for case in ALL}
    assert kinds == {"data", "config", "checkpoint", "signal", "concurrent", "disk", "hf", "prep"}
