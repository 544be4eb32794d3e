"""The CLI's promise for every failure, checked one way: a documented exit code, exactly one line on stderr
starting ``nanguard: error:``, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import Result

from nanguard.errors import ExitCode


def assert_one_line_error(
    result: Result | CliRun, code: ExitCode, *fragments: str, stdout_empty: bool = True
) -> None:
    """Assert the failure shape; ``fragments`` must appear in the error line. Commands that print a report
    before failing (a stopped ``nanguard yolo``) pass ``stdout_empty=False``."""
    assert result.exit_code == code, result.output
    if stdout_empty:
        assert result.stdout == "", result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanguard: error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


# A scan or command that blocks (a FIFO opened for reading) or runs quadratic must fail the test, not hang it.
CLI_TIMEOUT_S = 60.0


def run_cli(args: list[str], *, cwd: Path | None = None, timeout: float = CLI_TIMEOUT_S,
            stdin: int | None = subprocess.DEVNULL) -> CliRun:
    """``python -m nanguard ARGS`` in a fresh process, killed after ``timeout`` seconds (the test then fails
    with :class:`subprocess.TimeoutExpired`); returns its output, exit status and peak RSS in MiB.

    The RSS is the child's own (``RUSAGE_CHILDREN`` of a wrapper process that runs only it), so memory
    used by earlier test subprocesses cannot leak into it."""
    wrapper = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(code)\n")
    process = subprocess.Popen([sys.executable, "-c", wrapper, sys.executable, "-m", "nanguard", *args], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=stdin,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the wrapper and the blocked nanguard under it
        process.communicate()
        raise
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    *stderr, rss = done.stderr.splitlines() or ["0"]
    return CliRun(done.returncode, done.stdout, "\n".join(stderr) + ("\n" if stderr else ""), int(rss) / 1024)


@dataclass(frozen=True)
class CliRun:
    """What :func:`run_cli` saw: ``exit_code``, ``stdout``, ``stderr`` and ``rss_mib`` (peak resident memory)."""

    exit_code: int
    stdout: str
    stderr: str
    rss_mib: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr
