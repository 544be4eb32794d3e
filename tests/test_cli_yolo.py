"""Tests of ``nanguard yolo``: Ultralytics' own arguments, a guarded training, one-line errors.

One real training (YOLO11n from its yaml, offline, CPU, the shared synthetic dataset, two epochs of two steps);
the error tests stop before anything trains.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nanguard.ckpt import Status, audit
from nanguard.cli import app
from nanguard.errors import ExitCode
from tests.ckpt.test_safety import ShellCommand
from tests.cli_checks import assert_one_line_error

pytest.importorskip("ultralytics")

runner = CliRunner()


def _train_args(data: Path, project: Path) -> list[str]:
    return [
        "detect", "train", f"data={data}", "model=yolo11n.yaml", "epochs=2", "imgsz=32", "batch=4", "nbs=4",
        "workers=0", "device=cpu", "plots=False", "amp=False", f"project={project}", "name=run", "exist_ok=True",
        "warmup_epochs=0", "mosaic=0.0", "save_period=1", "verbose=False",
    ]


def test_guarded_training_from_the_command_line(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """``nanguard yolo detect train ...`` trains with the guard attached: exit 0, a finished run in the journal in
    the save_dir, every weights file clean, and the summary names the journal and the incidents command."""
    result = runner.invoke(app, ["yolo", *_train_args(yolo_dataset, tmp_path), "--policy", str(_policy(tmp_path))])
    assert result.exit_code == 0, result.output
    save_dir = tmp_path / "run"
    journal = save_dir / ".nanguard" / "journal.db"
    assert journal.is_file()
    db = sqlite3.connect(journal)
    try:
        assert [row[0] for row in db.execute("SELECT status FROM runs")] == ["finished"]
        policy = db.execute("SELECT policy FROM runs").fetchone()[0]
    finally:
        db.close()
    assert "7.5" in policy  # the --policy file's max_grad_norm, not the default
    weights = sorted((save_dir / "weights").glob("*.pt"))
    assert {"last.pt", "best.pt", "epoch0.pt", "epoch1.pt"} <= {p.name for p in weights}
    for path in weights:
        assert audit(path).status is Status.CLEAN, path
    assert str(journal) in result.stdout
    assert f"nanguard incidents {save_dir}" in result.stdout
    assert "steps:" in result.stdout and "4 (continue 4)" in result.stdout, result.stdout


def _policy(tmp_path: Path) -> Path:
    path = tmp_path / "nanguard.toml"
    path.write_text("max_grad_norm = 7.5\n")
    return path


@pytest.mark.parametrize(("args", "fragments"), [
    (["detect", "train", "epoch=3"], ["'epoch' is not a valid YOLO argument", "epochs"]),
    (["train", "imgsz=64", "lr=0.1"], ["'lr' is not a valid YOLO argument"]),
    (["train", "epochs"], ["missing an '=' sign"]),
    (["train", "epochs=abc"], ["epochs=abc", "invalid type"]),
    (["detect", "val", "model=yolo11n.yaml"], ["guards training only", "mode=val"]),
    (["checks"], ["'checks' is a yolo command"]),
])
def test_bad_arguments_are_one_line_errors(
    yolo_offline: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    """What Ultralytics' ``yolo`` rejects (unknown key, missing '=', bad type) and what nanguard does not guard
    (another mode, a special command): one line on stderr, exit 2, no help text, no traceback, no run folder."""
    result = runner.invoke(app, ["yolo", *args, f"project={tmp_path}"])
    assert_one_line_error(result, ExitCode.BAD_INPUT, *fragments, stdout_empty=False)
    assert "Arguments received" not in result.output  # Ultralytics' help text stays out
    assert not any(tmp_path.iterdir())


def test_what_ultralytics_itself_refuses_is_a_one_line_error(yolo_offline: Path, tmp_path: Path) -> None:
    """A missing dataset, and a clean checkpoint that is no Ultralytics model: Ultralytics raises (a RuntimeError,
    a TypeError); nanguard says so in one line with exit 2, no traceback (``--debug`` shows it)."""
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    cases = (
        ([f"data={tmp_path / 'missing.yaml'}", "model=yolo11n.yaml"], ["during setup", "missing.yaml"]),
        ([f"data={tmp_path / 'missing.yaml'}", f"model={plain}"], ["during setup", "TypeError", "plain.pt"]),
    )
    for args, fragments in cases:
        result = runner.invoke(app, ["yolo", "detect", "train", *args, "epochs=1", f"project={tmp_path}"])
        assert_one_line_error(result, ExitCode.BAD_INPUT, "Ultralytics failed", *fragments, stdout_empty=False)


def test_bad_policy_file_is_a_one_line_error(yolo_offline: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    result = runner.invoke(app, ["yolo", "train", "--policy", str(bad), f"project={tmp_path}"])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no_such_key", stdout_empty=False)


def test_stopped_training_exits_4_with_the_report(
    yolo_offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the guard raises ``TrainingStopped`` out of ``model.train``: its report on stdout, its message as the
    one error line, exit 4 (no training runs here: ``Model.train`` is replaced by one that raises)."""
    from ultralytics.engine.model import Model

    from nanguard.errors import TrainingStopped

    def stop(self: Model, **kwargs: object) -> None:
        raise TrainingStopped("nanguard stopped training at step 7: 3 rollbacks did not get past the incident",
                              ["step 5 (epoch 0, batch 5): nonfinite_loss -> rollback"])

    monkeypatch.setattr(Model, "train", stop)
    result = runner.invoke(app, ["yolo", "detect", "train", "model=yolo11n.yaml", "data=unused.yaml",
                                 f"project={tmp_path}"])
    assert_one_line_error(result, ExitCode.STOPPED, "stopped training at step 7", stdout_empty=False)
    assert "nanguard stopped the training" in result.stdout
    assert "step 5 (epoch 0, batch 5): nonfinite_loss -> rollback" in result.stdout



def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A real torch.save zip whose data.pkl REDUCEs os.system, with an Ultralytics-looking body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "model": None, "ema": None, "optimizer": {}, "train_args": {"epochs": 3},
                "payload": ShellCommand(marker)}, path)
    return path


@pytest.mark.parametrize("key", ["model", "pretrained", "resume", "distill_model"])
def test_yolo_refuses_an_unsafe_checkpoint_before_ultralytics_loads_it(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path, key: str
) -> None:
    """Every checkpoint ``nanguard yolo`` hands to Ultralytics is audited first: a pickle that would run
    ``os.system`` is refused in one line naming the file and the global, exit 3; the payload never runs and no
    run folder appears."""
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    project = tmp_path / "project"
    args = [arg for arg in _train_args(yolo_dataset, project) if not arg.startswith("model=")]
    model = [] if key == "model" else ["model=yolo11n.yaml"]
    result = runner.invoke(app, ["yolo", *args, *model, f"{key}={evil}"])
    assert_one_line_error(result, ExitCode.UNSAFE, str(evil), "system", stdout_empty=False)
    assert not marker.exists()
    assert not project.exists()


def test_yolo_resume_audits_the_last_pt_ultralytics_would_find(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ``resume`` with a yaml model makes Ultralytics load the newest ``last*.pt`` under the current
    folder: that file is the one audited and refused."""
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "runs" / "detect" / "train" / "weights" / "last.pt", marker)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["yolo", "detect", "train", "resume", "model=yolo11n.yaml", f"data={yolo_dataset}",
                                 "device=cpu", f"project={tmp_path / 'project'}"])
    assert_one_line_error(result, ExitCode.UNSAFE, "last.pt", "system", stdout_empty=False)
    assert str(evil.relative_to(tmp_path)) in result.stderr
    assert not marker.exists()


class PlainRecord:
    """A plain-data class outside the load allowlist."""


def test_yolo_refuses_unlisted_classes_without_trust(yolo_offline: Path, tmp_path: Path) -> None:
    """A checkpoint that only rebuilds classes outside the allowlist is not unsafe, but Ultralytics would import
    them: refused (exit 3) with the hint that loading needs --trust."""
    path = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": PlainRecord()}, path)
    result = runner.invoke(app, ["yolo", "detect", "train", f"model={path}", f"project={tmp_path / 'p'}"])
    assert_one_line_error(result, ExitCode.UNSAFE, str(path), f"{__name__}.PlainRecord", "--trust",
                          stdout_empty=False)
