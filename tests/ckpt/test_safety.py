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


class PlainRecord:
    """A plain-data class outside the load allowlist: pickled as ``cls.__new__(cls)`` + its ``__dict__``."""

    def __init__(self) -> None:
        self.note = "plain"


def test_plain_data_class_outside_the_allowlist_is_clean_but_not_loadable(tmp_path: Path) -> None:
    """Content is judged on its own: a class the pickle only rebuilds as data is not 'unsafe', yet loading with
    real classes (which imports its module) still needs ``trust``."""
    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.ones(3)}, "extra": PlainRecord()}, path)
    verdict = audit(path)
    name = f"{__name__}.PlainRecord"
    assert verdict.status is Status.CLEAN and verdict.content is Status.CLEAN
    assert verdict.unsafe_globals == () and verdict.unlisted_globals == (name,)
    with pytest.raises(UnsafeCheckpoint) as caught:
        load_checkpoint(path)
    assert caught.value.globals == (name,) and "outside the load allowlist" in str(caught.value)
    assert load_checkpoint(path, trust=True)["extra"].note == "plain"
    torch.save({"model": {"w": torch.tensor([1.0, float("nan")])}, "extra": PlainRecord()}, path)
    assert audit(path).status is Status.DIRTY


def test_unsafe_file_still_reports_its_content(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.tensor([float("nan")])}, "payload": ShellCommand(marker)}, path)
    verdict = audit(path)
    assert verdict.status is Status.UNSAFE and verdict.content is Status.DIRTY and verdict.findings
    _evil_checkpoint(tmp_path, marker)
    assert audit(tmp_path / "evil.pt").content is Status.CLEAN
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"(S'touch MARKER'\nios\nsystem\n.",  # INST with arguments: os.system('touch ...')
    b"(ios\nabort\n.",  # INST without arguments still calls a function: os.abort()
    b"(cos\nsystem\nS'touch MARKER'\no.",  # OBJ
    # copyreg._reconstructor(Popen, Popen, [cmd]) runs Popen.__init__([cmd]): a call of its base
    b"ccopy_reg\n_reconstructor\n(csubprocess\nPopen\ncsubprocess\nPopen\n(S'touch'\nS'MARKER'\nltR.",
])
def test_inst_obj_and_reconstructor_calls_are_unsafe(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "legacy.pkl"
    path.write_bytes(payload.replace(b"MARKER", str(tmp_path / MARKER_NAME).encode()))
    verdict = audit(path)
    assert verdict.status is Status.UNSAFE and verdict.unsafe_globals, verdict
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.parametrize(("payload", "name"), [
    (b"\x80\x02ctorch\nsave\n}X\x06\x00\x00\x00/tmp/x\x86R.", "torch.save"),
    (b"\x80\x02cpathlib\nPath.write_text\nX\x04\x00\x00\x00/tmp\x85R.", "pathlib.Path.write_text"),
    (b"\x80\x02cultralytics\nYOLO\nX\x07\x00\x00\x00evil.pt\x85R.", "ultralytics.YOLO"),
])
def test_calling_a_function_under_an_allowed_prefix_is_unsafe(tmp_path: Path, payload: bytes, name: str) -> None:
    """The allowlist names modules whose classes may be rebuilt; calling one of their functions (torch.save
    writes a file) or a model wrapper that loads another file is a call that runs code."""
    path = tmp_path / "call.pkl"
    path.write_bytes(payload)
    verdict = audit(path)
    assert verdict.status is Status.UNSAFE and verdict.unsafe_globals == (name,), verdict
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(path)
