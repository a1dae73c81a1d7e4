"""Fault injection for tests: a process that kills itself at a named point, to prove that a killed run resumes."""
import os
import signal
from collections import Counter

FAULT_ENV = "SEGDEPTH_TEST_KILL_AT"


def _parse_fault(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    event, _, count = text.partition(":")
    return event, int(count or 1)


_FAULT = _parse_fault(os.environ.get(FAULT_ENV))
_fault_counts: Counter = Counter()


def fault_point(event: str) -> None:
    """Test hook: with SEGDEPTH_TEST_KILL_AT=EVENT:N the process SIGKILLs itself the Nth time it passes EVENT
    (step: after an optimizer step; save: checkpoint files written, not yet published; publish: between the two
    renames; stage: a stage finished). Unset (always, outside tests) it costs one comparison."""
    if _FAULT is None or _FAULT[0] != event:
        return
    _fault_counts[event] += 1
    if _fault_counts[event] == _FAULT[1]:
        os.kill(os.getpid(), signal.SIGKILL)
