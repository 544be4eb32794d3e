"""The checkpoint keeper: a clean checkpoint is pinned, a bad one gets the pinned copy back (the bad one kept in
quarantine) or goes to quarantine, files and HF-style folders alike, every verdict and act in a real journal; an
unchanged checkpoint is not audited again; the guard's state sidecar comes back only for the very checkpoint it
was saved with."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nanguard.atomic import atomic_copy_tree, move_over, rename_over
from nanguard.ckpt import CheckpointKeeper, Status, load_guard_state, save_guard_state
from nanguard.ckpt.keeper import guard_state_path
from nanguard.journal import Journal, file_digest, read_actions, read_checkpoints


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path)
    yield journal
    journal.close()


@pytest.fixture()
def keeper(tmp_path: Path, journal: Journal) -> CheckpointKeeper:
    run_id = journal.start_run(policy={})
    return CheckpointKeeper(tmp_path, journal, run_id, step=7)


def _state(value: float = 1.0) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    weights = model.state_dict()
    weights["bias"].fill_(value)
    return {"model": weights, "optimizer": optimizer.state_dict(), "epoch": 1}


def _write_clean(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_state(value), path)
    return path


def _write_dirty(path: Path) -> Path:
    state = _state()
    next(iter(state["optimizer"]["state"].values()))["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)  # in place, as torch.save does: the same inode, new bytes
    return path


def _write_hf_folder(folder: Path, *, nan: bool = False) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.clone() for k, v in _state()["model"].items()}
    if nan:
        weights["weight"].view(-1)[1] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}), encoding="utf-8")
    return folder


def _actions(run_dir: Path) -> list[str]:
    return [a["action"] for a in read_actions(run_dir)]


def test_a_clean_file_is_pinned_and_its_verdict_journaled(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    verdict = keeper.keep(last, "last")
    assert verdict is not None and verdict.status is Status.CLEAN
    pinned = tmp_path / ".nanguard" / "pinned" / "last.pt"
    assert pinned.read_bytes() == last.read_bytes()
    assert pinned.stat().st_ino != last.stat().st_ino  # a copy: the trainer rewrites last.pt in place
    rows = read_checkpoints(tmp_path)
    assert [(Path(r["path"]).name, r["status"], r["sha256"]) for r in rows] == [
        ("last.pt", "clean", file_digest(last)[0])]  # type: ignore[index]
    assert _actions(tmp_path) == []


def test_a_dirty_file_gets_the_pinned_copy_back_and_is_kept_in_quarantine(
    tmp_path: Path, keeper: CheckpointKeeper
) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    keeper.keep(last, "last")
    clean_bytes = last.read_bytes()
    _write_dirty(last)
    dirty_bytes = last.read_bytes()
    verdict = keeper.keep(last, "last")
    assert verdict is not None and verdict.status is Status.DIRTY
    assert last.read_bytes() == clean_bytes
    quarantined = tmp_path / ".nanguard" / "quarantine" / "last.pt"
    assert quarantined.read_bytes() == dirty_bytes
    (action,) = read_actions(tmp_path)
    assert action["action"] == "checkpoint_replaced" and action["step"] == 7
    assert action["detail"]["quarantined_to"] == str(quarantined)
    assert action["detail"]["restored_sha256"] == file_digest(last)[0]  # type: ignore[index]
    # what was put back is known: not audited again
    assert keeper.keep(last, "last") is None
    # the trainer rewrites last.pt in place later: the pin and the quarantined file stay as they were
    _write_clean(last, value=3.0)
    assert (tmp_path / ".nanguard" / "pinned" / "last.pt").read_bytes() == clean_bytes
    assert quarantined.read_bytes() == dirty_bytes


def test_a_dirty_file_without_a_pin_stays_and_the_journal_says_so(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    last = _write_dirty(_write_clean(tmp_path / "weights" / "last.pt"))
    verdict = keeper.keep(last, "last")
    assert verdict is not None and verdict.status is Status.DIRTY
    assert last.is_file() and _actions(tmp_path) == ["checkpoint_not_replaced"]


def test_a_bad_file_without_a_role_is_moved_to_quarantine(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    epoch = _write_dirty(_write_clean(tmp_path / "weights" / "epoch2.pt"))
    data = epoch.read_bytes()
    verdict = keeper.keep(epoch)
    assert verdict is not None and verdict.status is Status.DIRTY
    assert not epoch.exists()
    assert (tmp_path / ".nanguard" / "quarantine" / "epoch2.pt").read_bytes() == data
    assert _actions(tmp_path) == ["checkpoint_quarantined"]


def test_an_unreadable_file_counts_as_bad(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    keeper.keep(_write_clean(tmp_path / "weights" / "last.pt"), "last")
    (tmp_path / "weights" / "last.pt").write_bytes(b"not a checkpoint")
    verdict = keeper.keep(tmp_path / "weights" / "last.pt", "last")
    assert verdict is not None and verdict.status is Status.UNREADABLE
    assert _actions(tmp_path) == ["checkpoint_replaced"]


def test_the_same_bytes_under_two_roles_are_audited_once_and_pinned_as_one_file(
    tmp_path: Path, keeper: CheckpointKeeper
) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    best = tmp_path / "weights" / "best.pt"
    best.write_bytes(last.read_bytes())
    verdicts = keeper.keep_all([(last, "last"), (best, "best")])
    assert [v.path.name for v in verdicts] == ["last.pt", "best.pt"]
    assert all(v.status is Status.CLEAN for v in verdicts)
    pinned = tmp_path / ".nanguard" / "pinned"
    assert (pinned / "last.pt").stat().st_ino == (pinned / "best.pt").stat().st_ino
    assert len(read_checkpoints(tmp_path)) == 2  # recorded for each path
    # re-pinning last replaces it by rename: the pinned best keeps its bytes
    before = (pinned / "best.pt").read_bytes()
    keeper.keep(_write_clean(last, value=5.0), "last")
    assert (pinned / "best.pt").read_bytes() == before != (pinned / "last.pt").read_bytes()


def test_an_unchanged_file_is_not_audited_again(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    assert keeper.keep(last, "last") is not None
    assert keeper.audit_if_new(last) is None and keeper.keep(last, "last") is None
    assert len(keeper.verdicts) == 1 and len(read_checkpoints(tmp_path)) == 1
    os.utime(last, (1_000_000, 1_000_000))  # touched: audited again
    assert keeper.audit_if_new(last) is not None
    assert keeper.audit_if_new(tmp_path / "weights" / "missing.pt") is None


def test_a_clean_folder_is_pinned_and_a_dirty_one_gets_it_back(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    folder = _write_hf_folder(tmp_path / "out" / "checkpoint-best")
    verdict = keeper.keep(folder, "best")
    assert verdict is not None and verdict.status is Status.CLEAN, verdict
    pinned = tmp_path / ".nanguard" / "pinned" / "best"
    assert sorted(p.name for p in pinned.iterdir()) == ["config.json", "model.safetensors"]
    clean = (folder / "model.safetensors").read_bytes()

    _write_hf_folder(folder, nan=True)
    dirty = (folder / "model.safetensors").read_bytes()
    verdict = keeper.keep(folder, "best")
    assert verdict is not None and verdict.status is Status.DIRTY
    assert (folder / "model.safetensors").read_bytes() == clean
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / ".nanguard" / "quarantine" / "checkpoint-best" / "model.safetensors").read_bytes() == dirty
    assert _actions(tmp_path) == ["checkpoint_replaced"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_a_dirty_folder_without_a_role_is_moved_to_quarantine(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    folder = _write_hf_folder(tmp_path / "out" / "checkpoint-500", nan=True)
    verdict = keeper.keep(folder)
    assert verdict is not None and verdict.status is Status.DIRTY
    assert not folder.exists()
    assert (tmp_path / ".nanguard" / "quarantine" / "checkpoint-500" / "config.json").is_file()
    # a second bad one of the same name replaces the older one in quarantine
    _write_hf_folder(folder, nan=True)
    keeper.keep(folder)
    assert _actions(tmp_path) == ["checkpoint_quarantined"] * 2


def test_for_guard_reads_the_guards_journal_run_and_current_step(tmp_path: Path, journal: Journal) -> None:
    class Host:
        def __init__(self) -> None:
            self.journal, self.run_id, self.step_count = journal, journal.start_run(policy={}), 3

    host = Host()
    keeper = CheckpointKeeper.for_guard(host, tmp_path)
    host.step_count = 11
    keeper.keep(_write_dirty(_write_clean(tmp_path / "epoch0.pt")))
    (action,) = read_actions(tmp_path)
    assert (action["run_id"], action["step"]) == (host.run_id, 11)


def test_guard_state_round_trips_bound_to_the_checkpoint(tmp_path: Path) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    state = {"version": 1, "spike": {"mean": 0.5, "count": 12}, "controller": "probation", "ids": [1, 2]}
    path = save_guard_state(tmp_path, last, state)
    assert path == tmp_path / ".nanguard" / "guard_state" / "last.json"
    assert load_guard_state(tmp_path, last) == state
    assert load_guard_state(tmp_path, tmp_path / "weights" / "best.pt") is None  # none saved


def test_guard_state_of_a_replaced_checkpoint_is_refused(tmp_path: Path) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    save_guard_state(tmp_path, last, {"steps": 4})
    _write_clean(last, value=2.0)
    with pytest.raises(ValueError, match="not the checkpoint its guard state was saved with"):
        load_guard_state(tmp_path, last)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"format": "other"}'])
def test_a_broken_guard_state_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    last = _write_clean(tmp_path / "last.pt")
    sidecar = guard_state_path(tmp_path, last)
    sidecar.parent.mkdir(parents=True)
    sidecar.write_bytes(content)
    with pytest.raises(ValueError, match="not a nanguard guard state file"):
        load_guard_state(tmp_path, last)


def test_guard_state_must_be_a_json_dict(tmp_path: Path) -> None:
    last = _write_clean(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="must be a dict"):
        save_guard_state(tmp_path, last, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not JSON"):
        save_guard_state(tmp_path, last, {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        save_guard_state(tmp_path, tmp_path / "missing.pt", {})


def test_a_put_back_checkpoint_brings_back_its_own_guard_state(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    last = _write_clean(tmp_path / "weights" / "last.pt")
    save_guard_state(tmp_path, last, {"at": "clean"})
    keeper.keep(last, "last")
    _write_dirty(last)
    save_guard_state(tmp_path, last, {"at": "dirty"})
    keeper.keep(last, "last")
    assert load_guard_state(tmp_path, last) == {"at": "clean"}


def test_a_quarantined_checkpoint_takes_its_guard_state_along(tmp_path: Path, keeper: CheckpointKeeper) -> None:
    epoch = _write_dirty(_write_clean(tmp_path / "weights" / "epoch1.pt"))
    save_guard_state(tmp_path, epoch, {"at": "dirty"})
    keeper.keep(epoch)
    assert load_guard_state(tmp_path, epoch) is None
    assert (tmp_path / ".nanguard" / "quarantine" / "epoch1.pt.guard_state.json").is_file()


def test_folder_moves_replace_whole_folders(tmp_path: Path) -> None:
    old, new = tmp_path / "target", tmp_path / "new"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "stale.bin").write_bytes(b"old")
    (new / "a").mkdir(parents=True)
    (new / "a" / "x.bin").write_bytes(b"new")
    copy = tmp_path / "copy"
    atomic_copy_tree(new, copy)
    rename_over(new, old)
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*")) == ["a", "a/x.bin"]
    move_over(copy, old)
    assert (old / "a" / "x.bin").read_bytes() == b"new" and not copy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
