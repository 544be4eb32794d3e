"""Hostile and broken inputs: code is never run, unsafe globals are named, bad files give a clean error."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.ckpt import (
    NoCheckpointsFound,
    Status,
    UnsafeCheckpoint,
    audit,
    audit_paths,
    load_checkpoint,
    read_checkpoint,
)
from nanguard.errors import ExitCode

MARKER_NAME = "pwned"


class ShellCommand:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(folder: Path, marker: Path) -> Path:
    path = folder / "evil.pt"
    torch.save({"model": {"w": torch.ones(3)}, "payload": ShellCommand(marker)}, path)
    return path


def test_pickle_that_would_run_a_shell_command_is_unsafe_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = _evil_checkpoint(tmp_path, marker)
    verdict = audit(path)
    assert verdict.status is Status.UNSAFE
    assert verdict.unsafe_globals == ("posix.system",) or verdict.unsafe_globals == ("os.system",)
    with pytest.raises(UnsafeCheckpoint) as caught:
        load_checkpoint(path)
    assert caught.value.exit_code is ExitCode.UNSAFE and caught.value.globals == verdict.unsafe_globals
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps({"x": ShellCommand(marker)}, protocol=4))
    assert audit(plain).status is Status.UNSAFE
    assert not marker.exists()


def test_builtins_eval_and_getattr_are_unsafe(tmp_path: Path) -> None:
    payload = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(tmp_path / MARKER_NAME).encode() + b"')\ntR."
    (tmp_path / "eval.pkl").write_bytes(payload)
    verdict = audit(tmp_path / "eval.pkl")
    assert verdict.status is Status.UNSAFE and verdict.unsafe_globals == ("builtins.eval",)
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", os.urandom(4096), b"\x80\x04K\x01"])
def test_empty_truncated_and_random_files_are_unreadable_with_a_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    verdict = audit(path)
    assert verdict.status in (Status.UNREADABLE, Status.CLEAN)  # b"\x80\x04K\x01" is a valid pickle of 1
    if verdict.status is Status.UNREADABLE:
        assert verdict.error and str(path) in verdict.error


def test_truncated_real_checkpoint_is_unreadable(yolo_clean_run: Path, tmp_path: Path) -> None:
    data = (yolo_clean_run / "epoch1.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        verdict = audit(tmp_path / "cut.pt")
        assert verdict.status is Status.UNREADABLE and "zip" in (verdict.error or ""), verdict


def test_missing_path_is_unreadable(tmp_path: Path) -> None:
    verdict = audit(tmp_path / "nope.pt")
    assert verdict.status is Status.UNREADABLE and "no such file" in (verdict.error or "")


def test_folder_without_checkpoints_raises_bad_input(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(NoCheckpointsFound) as caught:
        audit_paths([tmp_path])
    assert caught.value.exit_code is ExitCode.BAD_INPUT


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small real checkpoints (zip and legacy) that also carry a shell-command payload."""
    folder = tmp_path_factory.mktemp("fuzz")
    marker = folder / MARKER_NAME
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    optimizer.step()
    obj = {"model": model, "optimizer": optimizer.state_dict(), "payload": ShellCommand(marker), "epoch": 3}
    torch.save(obj, folder / "zip.pt")
    torch.save(obj, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    return {"zip": (folder / "zip.pt").read_bytes(), "legacy": (folder / "legacy.pt").read_bytes(),
            "marker": str(marker).encode()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_checkpoint_never_raises_or_runs_code(
    fuzz_seeds: dict[str, bytes], tmp_path: Path, data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(["zip", "legacy"]))
    blob = bytearray(fuzz_seeds[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path / f"mutated_{kind}.pt"
    path.write_bytes(bytes(blob))
    verdict = audit(path)  # must not raise
    assert verdict.status in set(Status)
    if verdict.status is Status.UNREADABLE:
        assert verdict.error
    assert not Path(fuzz_seeds["marker"].decode()).exists()
    try:
        read_checkpoint(path)
    except Exception as exc:  # only the documented error may escape
        assert type(exc).__name__ == "UnreadableCheckpoint", exc
