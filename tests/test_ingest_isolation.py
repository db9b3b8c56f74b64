"""Extraction runs in a child process: killed (with what it started) at the deadline, capped in memory.

The work functions live at module level because the child receives them by name.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import ingest
from ingest import IngestError, IngestSettings
from ingest.watchdog import ChildLimits, Deadline, Progress, run_isolated

GONE_WAIT_S = 10.0


def spin_after_starting_a_grandchild(pid_file: str, deadline: Deadline) -> None:
    """Start a long-running program, note both pids, then compute without ever checking the deadline."""
    sleeper = subprocess.Popen(["sleep", "600"])
    Path(pid_file).write_text(f"{os.getpid()} {sleeper.pid}")
    while True:
        sum(range(10_000))


def allocate_forever(deadline: Deadline) -> None:
    hoard = []
    while True:
        hoard.append(bytearray(64 * 1024 * 1024))


def report_three_steps(deadline: Deadline) -> str:
    for step in range(3):
        deadline.report("reading", step + 1, 3)
    return "finished"


def extend_then_sleep(extra_s: float, sleep_s: float, deadline: Deadline) -> str:
    deadline.extend(extra_s)
    time.sleep(sleep_s)
    deadline.check()
    return "finished"


def fail_with(error: IngestError, deadline: Deadline) -> None:
    raise error


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def wait_gone(pid: int) -> bool:
    stop = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < stop:
        if is_gone(pid):
            return True
        time.sleep(0.05)
    return is_gone(pid)


def test_deadline_kills_the_child_and_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    limits = ChildLimits(time_limit_s=2.0, memory_bytes=1 << 30)
    with pytest.raises(IngestError) as caught:
        run_isolated(spin_after_starting_a_grandchild, (str(pid_file),), limits)
    assert caught.value.reason == "timeout"
    child, grandchild = (int(pid) for pid in pid_file.read_text().split())
    assert is_gone(child), "the extraction process must be gone when the caller hears it stopped"
    assert wait_gone(grandchild), "a program the extraction started must not keep running"


def test_memory_cap_stops_a_runaway_parser() -> None:
    limits = ChildLimits(time_limit_s=60.0, memory_bytes=768 * 1024 * 1024)
    with pytest.raises(IngestError) as caught:
        run_isolated(allocate_forever, (), limits)
    assert caught.value.reason == "too_large"
    assert "0.75 GB" in caught.value.message


def test_progress_reaches_the_caller_in_order() -> None:
    seen: list[Progress] = []
    result = run_isolated(report_three_steps, (), ChildLimits(30.0, 1 << 30), seen.append)
    assert result == "finished"
    assert [(p.phase, p.done, p.total) for p in seen] == [("reading", 1, 3), ("reading", 2, 3), ("reading", 3, 3)]


@pytest.mark.parametrize(
    ("allowed_extension_s", "expected"), [(5.0, "finished"), (0.0, "timeout")], ids=["within-bound", "no-extension"]
)
def test_extra_time_only_within_the_callers_bound(allowed_extension_s: float, expected: str) -> None:
    limits = ChildLimits(time_limit_s=1.0, memory_bytes=1 << 30, max_extension_s=allowed_extension_s)
    try:
        outcome = run_isolated(extend_then_sleep, (5.0, 2.0), limits)
    except IngestError as error:
        outcome = error.reason
    assert outcome == expected


def test_errors_cross_the_process_boundary_intact() -> None:
    error = IngestError("corrupt", "The PDF is damaged or truncated and could not be read.")
    with pytest.raises(IngestError) as caught:
        run_isolated(fail_with, (error,), ChildLimits(30.0, 1 << 30))
    assert (caught.value.reason, caught.value.message) == (error.reason, error.message)


def test_extract_leaves_no_process_behind_after_a_timeout() -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=10)
    for page in range(300):
        pdf.add_page()
        for line in range(40):
            pdf.cell(0, 6, f"Clause {page}.{line}: the parties agree to the terms set out below.", new_x="LMARGIN",
                     new_y="NEXT")
    data = bytes(pdf.output())
    with pytest.raises(IngestError) as caught:
        ingest.extract(data, "long.pdf", settings=IngestSettings(time_limit_s=0.3))
    assert caught.value.reason == "timeout"
    assert multiprocessing.active_children() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("ingest")], "no reader left running here"
