"""Atomic saving and trusted loading."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nanguard.ckpt import load_checkpoint, save_checkpoint


def test_save_replaces_atomically_and_cleans_up_after_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint({"v": torch.ones(4)}, tmp_path / "last.pt")
    os.chmod(path, 0o640)

    def broken_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"v": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["v"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    save_checkpoint({"v": torch.full((4,), 2.0)}, path)
    assert torch.equal(torch.load(path)["v"], torch.full((4,), 2.0))
    assert path.stat().st_mode & 0o777 == 0o640


def test_crash_at_any_moment_leaves_old_or_new_file_never_a_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    writer = textwrap.dedent(f"""
        import torch
        from nanguard.ckpt import save_checkpoint
        for i in range(1, 10_000):
            save_checkpoint({{"i": i, "w": torch.full((1 << 19,), float(i))}}, {str(path)!r})
    """)
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(rng.uniform(2.0, 3.5))  # import torch, then a few saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            ckpt = torch.load(path)
            assert torch.equal(ckpt["w"], torch.full((1 << 19,), float(ckpt["i"])))


def test_trusted_load_returns_real_classes_for_allowlisted_globals(yolo_clean_run: Path) -> None:
    ckpt = load_checkpoint(yolo_clean_run / "epoch1.pt")
    assert type(ckpt["ema"]).__name__ == "DetectionModel"
    assert ckpt["epoch"] == 1


def test_trusted_load_of_hf_folder_and_safetensors(hf_checkpoint: Path) -> None:
    loaded = load_checkpoint(hf_checkpoint)
    assert "bert.embeddings.word_embeddings.weight" in loaded["model"]
    assert loaded["trainer_state"]["global_step"] == 4 and "state" in loaded["optimizer"]
    weights = load_checkpoint(hf_checkpoint / "model.safetensors")
    assert weights.keys() == loaded["model"].keys()
