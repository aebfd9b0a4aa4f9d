"""How a fault case can end (docs/reliability.md), and the report property that carries it to the tally."""

OUTCOMES = ("clean", "traceback", "hang", "silent", "lost")
FAULT_OUTCOME = "fault_outcome"  # a user property of each case's test report: (case name, outcome)
