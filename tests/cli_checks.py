"""The CLI's promise for every failure, checked one way: a documented exit code, exactly one line on stderr
starting ``nanguard: error:``, no traceback."""

from __future__ import annotations

from typer.testing import Result

from nanguard.errors import ExitCode


def assert_one_line_error(result: Result, code: ExitCode, *fragments: str, stdout_empty: bool = True) -> None:
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
