"""Audit verdicts on checkpoints from real frameworks: clean ones pass, each dirty variant is found in place."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nanguard.ckpt import Area, Format, Kind, Status, audit, audit_paths, inspect_checkpoint, save_checkpoint
from tests.conftest import copy_tree


def _kinds(verdict: object) -> set[tuple[str, Kind]]:
    return {(f.location, f.kind) for f in verdict.findings}  # type: ignore[attr-defined]


def test_plain_torch_save_audits_clean(tmp_path: Path, small_state: dict) -> None:
    path = save_checkpoint(small_state, tmp_path / "plain.pt")
    verdict = audit(path)
    assert verdict.status is Status.CLEAN, verdict
    assert verdict.format is Format.TORCH and verdict.epoch == 1


def test_safetensors_save_file_audits_clean(tmp_path: Path, small_state: dict) -> None:
    from safetensors.torch import save_file

    save_file(small_state["model"], str(tmp_path / "model.safetensors"))
    verdict = audit(tmp_path / "model.safetensors")
    assert verdict.status is Status.CLEAN and verdict.format is Format.SAFETENSORS, verdict


def test_dcp_save_audits_clean_and_finds_nan_in_optimizer(tmp_path: Path, small_state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):
        dcp.save(small_state, checkpoint_id=str(tmp_path / "clean"))
    assert audit(tmp_path / "clean").status is Status.CLEAN
    small_state["optimizer"]["state"][0]["exp_avg"].view(-1)[3] = math.nan
    with pytest.warns(UserWarning):
        dcp.save(small_state, checkpoint_id=str(tmp_path / "dirty"))
    verdict = audit(tmp_path / "dirty")
    assert verdict.format is Format.DCP and verdict.status is Status.DIRTY
    assert [(f.location, f.kind, f.count, f.area) for f in verdict.findings] == [
        ("optimizer.state.0.exp_avg", Kind.NAN, 1, Area.OPTIMIZER)
    ]


def test_ultralytics_mid_training_and_stripped_checkpoints_audit_clean(yolo_clean_run: Path) -> None:
    verdicts = {v.path.name: v for v in audit_paths([yolo_clean_run])}
    assert set(verdicts) == {"best.pt", "last.pt", "epoch0.pt", "epoch1.pt"}
    for verdict in verdicts.values():
        assert verdict.status is Status.CLEAN, [str(f) for f in verdict.findings]
        assert verdict.format is Format.ULTRALYTICS
        assert not verdict.unsafe_globals
    assert verdicts["epoch1.pt"].epoch == 1 and verdicts["epoch1.pt"].step
    assert verdicts["last.pt"].epoch == -1  # stripped by final_eval


def test_lightning_fit_checkpoint_audits_clean_with_inf_sentinels(lightning_ckpt: Path) -> None:
    verdict = audit(lightning_ckpt)
    assert verdict.status is Status.CLEAN, [str(f) for f in verdict.findings]
    assert verdict.format is Format.LIGHTNING and verdict.epoch == 1 and verdict.step == 8
    assert verdict.fitness is not None and math.isfinite(verdict.fitness)
    # The second ModelCheckpoint (no monitor) keeps kth_value=inf: a sentinel, not dirt.
    assert all(v.status is Status.CLEAN for v in audit_paths([lightning_ckpt.parent.parent]))


def test_hf_trainer_checkpoint_folder_audits_clean(hf_checkpoint: Path) -> None:
    verdict = audit(hf_checkpoint)
    assert verdict.status is Status.CLEAN, [str(f) for f in verdict.findings]
    assert verdict.format is Format.HUGGINGFACE and verdict.step == 4
    assert any(g.startswith("transformers.") for g in verdict.globals)  # training_args.bin was read


def test_hf_nan_in_log_history_is_found(hf_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_tree(hf_checkpoint, tmp_path / "checkpoint-4")
    state = json.loads((folder / "trainer_state.json").read_text())
    state["log_history"][2]["loss"] = math.nan
    (folder / "trainer_state.json").write_text(json.dumps(state))
    verdict = audit(folder)
    assert _kinds(verdict) == {("trainer_state.log_history.2.loss", Kind.NAN)}
    assert verdict.findings[0].area is Area.HISTORY


def test_one_nan_in_a_large_tensor_is_found_with_its_index(tmp_path: Path) -> None:
    weight = torch.randn(1024, 4096)
    weight[700, 1234] = math.nan
    save_checkpoint({"encoder.weight": weight, "encoder.bias": torch.zeros(1024)}, tmp_path / "big.pt")
    (finding,) = audit(tmp_path / "big.pt").findings
    assert (finding.location, finding.kind, finding.count, finding.first_index) == (
        "encoder.weight", Kind.NAN, 1, (700, 1234))
    assert finding.area is Area.MODEL and finding.numel == 1024 * 4096


def _edited_yolo(src: Path, dst: Path, edit: object) -> Path:
    from nanguard.ckpt import load_checkpoint

    ckpt = load_checkpoint(src)
    edit(ckpt)  # type: ignore[operator]
    return save_checkpoint(ckpt, dst)


def test_nan_in_ema_only_is_found_at_its_module_path(yolo_clean_run: Path, tmp_path: Path) -> None:
    def edit(ckpt: dict) -> None:
        ckpt["ema"].model[0].conv.weight.data[1, 2, 0, 1] = math.nan

    verdict = audit(_edited_yolo(yolo_clean_run / "epoch1.pt", tmp_path / "ema.pt", edit))
    assert [(f.location, f.kind, f.count, f.first_index, f.area) for f in verdict.findings] == [
        ("ema.model.0.conv.weight", Kind.NAN, 1, (1, 2, 0, 1), Area.EMA)]


def test_nan_in_optimizer_moments_only_is_found(yolo_clean_run: Path, tmp_path: Path) -> None:
    def edit(ckpt: dict) -> None:
        state = ckpt["optimizer"]["state"][5]
        state["exp_avg"].view(-1)[0] = math.inf
        state["exp_avg_sq"].view(-1)[2] = -1.0

    verdict = audit(_edited_yolo(yolo_clean_run / "epoch1.pt", tmp_path / "opt.pt", edit))
    assert _kinds(verdict) == {("optimizer.state.5.exp_avg", Kind.POS_INF),
                               ("optimizer.state.5.exp_avg_sq", Kind.NEGATIVE_SECOND_MOMENT)}
    assert {f.area for f in verdict.findings} == {Area.OPTIMIZER}


def test_nan_in_best_fitness_and_results_history_only_is_found(yolo_clean_run: Path, tmp_path: Path) -> None:
    def edit(ckpt: dict) -> None:
        ckpt["best_fitness"] = np.float64("nan")
        ckpt["train_results"]["train/box_loss"][1] = math.nan

    verdict = audit(_edited_yolo(yolo_clean_run / "epoch1.pt", tmp_path / "hist.pt", edit))
    assert _kinds(verdict) == {("best_fitness", Kind.NAN), ("train_results.train/box_loss", Kind.NAN)}
    history = next(f for f in verdict.findings if f.location.startswith("train_results"))
    assert history.first_index == (1,) and history.area is Area.HISTORY


def test_checkpoint_scrubbed_by_ultralytics_after_real_nan_is_dirty(yolo_scrubbed_run: Path) -> None:
    verdict = audit(yolo_scrubbed_run / "epoch0.pt")
    assert verdict.status is Status.DIRTY
    kinds = {f.kind for f in verdict.findings}
    assert {Kind.SCRUBBED, Kind.ZERO_WEIGHT, Kind.ZERO_RUNNING_VAR} <= kinds
    # Ultralytics scrubbed the EMA, so no NaN there; the optimizer moments kept theirs.
    assert not [f for f in verdict.findings if f.area is Area.EMA and f.kind is Kind.NAN]
    assert any(f.area is Area.OPTIMIZER and f.kind is Kind.NAN for f in verdict.findings)
    assert "ema.model.0.bn.running_var" in {f.location for f in verdict.findings}
    stripped = audit(yolo_scrubbed_run / "last.pt")
    assert stripped.status is Status.DIRTY and stripped.epoch == -1
    assert any(f.kind is Kind.SCRUBBED and f.location == "model" for f in stripped.findings)


def test_fp16_values_saturated_at_65504_are_reported(tmp_path: Path) -> None:
    weight = torch.randn(8, 8).half()
    weight[3, 4] = 65504.0
    save_checkpoint({"fc.weight": weight}, tmp_path / "sat.pt")
    assert _kinds(audit(tmp_path / "sat.pt")) == {("fc.weight", Kind.FP16_SATURATED)}


def test_inspect_reports_format_position_keys_and_tensor_totals(yolo_clean_run: Path) -> None:
    info = inspect_checkpoint(yolo_clean_run / "epoch1.pt")
    assert info.verdict.format is Format.ULTRALYTICS and info.verdict.epoch == 1
    assert {"ema", "optimizer", "train_results", "epoch"} <= set(info.top_keys)
    assert info.tensor_count > 400 and info.tensor_bytes > 0
    assert {"float16", "float32"} <= set(info.dtypes)
