"""The fault suite's tally, printed after the test session: how many cases ended each way."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.faults.harness import OUTCOMES
    from tests.faults.test_fault_suite import TALLY

    if not TALLY:
        return
    counts = {outcome: sum(1 for o in TALLY.values() if o == outcome) for outcome in OUTCOMES}
    terminalreporter.write_line(
        f"fault suite: {len(TALLY)} cases: " + ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
    )
