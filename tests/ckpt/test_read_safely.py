"""The inert reader: trees, module paths, globals, containers, and reading without the frameworks installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from nanguard.ckpt import Format, InertObject, UnreadableCheckpoint, iter_tensors, read_checkpoint


def test_pickled_ema_module_tensors_are_named_by_module_path(yolo_clean_run: Path) -> None:
    tree = read_checkpoint(yolo_clean_run / "epoch1.pt")
    assert isinstance(tree.root["ema"], InertObject)
    assert tree.root["ema"].qualname() == "ultralytics.nn.tasks.DetectionModel"
    names = dict(iter_tensors(tree.root))
    assert names["ema.model.0.conv.weight"].dtype == torch.float16
    assert "ema.model.0.bn.running_var" in names
    assert "ultralytics.nn.tasks.DetectionModel" in tree.globals
    assert "torch._utils._rebuild_tensor_v2" in tree.globals


def test_reader_matches_torch_load_values(yolo_clean_run: Path) -> None:
    from nanguard.ckpt import load_checkpoint

    real = load_checkpoint(yolo_clean_run / "epoch1.pt")["ema"].state_dict()
    inert = dict(iter_tensors(read_checkpoint(yolo_clean_run / "epoch1.pt").root))
    for name, tensor in real.items():
        assert torch.equal(inert[f"ema.{name}"], tensor), name


def test_reader_works_without_ultralytics_lightning_or_transformers(
    yolo_clean_run: Path, lightning_ckpt: Path
) -> None:
    script = textwrap.dedent(f"""
        import sys
        for name in ("ultralytics", "lightning", "pytorch_lightning", "transformers"):
            sys.modules[name] = None  # importing them now raises ImportError
        from nanguard.ckpt import audit
        for path in ({str(yolo_clean_run / "epoch1.pt")!r}, {str(lightning_ckpt)!r}):
            verdict = audit(path)
            assert verdict.status.value == "clean", (path, verdict)
        assert not any(sys.modules.get(n) for n in ("ultralytics", "lightning", "transformers"))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_zip_storages_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, tmp_path / "m.pt")
    w = read_checkpoint(tmp_path / "m.pt").root["w"]
    assert torch.equal(w, torch.arange(4096, dtype=torch.float32))
    assert w.untyped_storage().nbytes() >= (tmp_path / "m.pt").stat().st_size  # a view of the whole-file map


def test_legacy_format_is_read(tmp_path: Path, small_state: dict) -> None:
    torch.save(small_state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    tree = read_checkpoint(tmp_path / "old.pt")
    assert tree.container == "legacy"
    assert torch.equal(tree.root["model"]["0.weight"], small_state["model"]["0.weight"])


def test_lightning_and_hf_folders_are_read_into_one_tree(lightning_ckpt: Path, hf_checkpoint: Path) -> None:
    lightning = read_checkpoint(lightning_ckpt)
    assert lightning.format is Format.LIGHTNING and "net.0.weight" in lightning.root["state_dict"]
    hf = read_checkpoint(hf_checkpoint)
    assert {"model", "optimizer", "scheduler", "rng_state", "trainer_state", "training_args"} <= set(hf.root)
    assert hf.root["trainer_state"]["global_step"] == 4


def test_folder_that_is_no_checkpoint_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    try:
        read_checkpoint(tmp_path)
    except UnreadableCheckpoint as exc:
        assert "neither" in str(exc) and exc.exit_code == 2
    else:
        raise AssertionError("expected UnreadableCheckpoint")
