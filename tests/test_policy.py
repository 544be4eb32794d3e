"""Policy: defaults a user would expect, loadable from nanguard.toml or [tool.nanguard] in pyproject.toml,
and every bad key or value is an error that names the key (and the file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanguard import Policy, PolicyError
from nanguard.errors import ExitCode
from nanguard.policy import MAX_POLICY_BYTES


def test_defaults_skip_nonfinite_and_loss_spikes_and_clip_gradient_spikes() -> None:
    policy = Policy()
    assert (policy.on_loss_spike, policy.on_grad_spike, policy.check_every_steps) == ("skip", "clip", 100)
    assert policy.sync_free is False and policy.max_grad_norm is None


def test_nanguard_toml_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "nanguard.toml").write_text('check_every_steps = 10\nmax_grad_norm = 1.5\nlr_backoff_on = ["skip"]\n')
    policy = Policy.discover(tmp_path)
    assert (policy.check_every_steps, policy.max_grad_norm, policy.lr_backoff_on) == (10, 1.5, ("skip",))


def test_pyproject_tool_nanguard_table_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.nanguard]\nloss_spike_z = 4.0\n')
    assert Policy.discover(tmp_path).loss_spike_z == 4.0


def test_no_policy_file_means_defaults(tmp_path: Path) -> None:
    assert Policy.discover(tmp_path) == Policy()


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nanguard.toml"
    path.write_text("check_evry_steps = 10\n")
    with pytest.raises(PolicyError, match=r"nanguard.toml: unknown key 'check_evry_steps'") as err:
        Policy.from_file(path)
    assert err.value.exit_code == ExitCode.BAD_INPUT


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("check_every_steps = 0", "check_every_steps must be an integer >= 1, got 0"),
        ("check_every_steps = 2.5", "check_every_steps must be an integer >= 1, got 2.5"),
        ("max_grad_norm = -1.0", "max_grad_norm must be a positive number, got -1.0"),
        ("stats_decay = 1.0", r"stats_decay must be a number in \(0, 1\), got 1.0"),
        ('on_loss_spike = "clip"', "on_loss_spike must be one of skip, record; got 'clip'"),
        ('on_grad_spike = "explode"', "on_grad_spike must be one of skip, clip, record; got 'explode'"),
        ('lr_backoff_on = ["rollback", "nap"]', "lr_backoff_on must be one of .*got 'nap'"),
        ('sync_free = "yes"', "sync_free must be true or false, got 'yes'"),
        ("loss_spike_z = true", "loss_spike_z must be a positive number, got True"),
    ],
)
def test_bad_value_names_key_value_and_file(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "nanguard.toml"
    path.write_text(line + "\n")
    with pytest.raises(PolicyError, match=f"{path}: {message}"):
        Policy.from_file(path)


def test_invalid_toml_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "nanguard.toml"
    path.write_text("check_every_steps = = 3\n")
    with pytest.raises(PolicyError, match=r"nanguard\.toml: not valid TOML"):
        Policy.from_file(path)
    with pytest.raises(PolicyError, match=r"missing\.toml: no such policy file"):
        Policy.from_file(tmp_path / "missing.toml")


def test_bad_value_in_code_raises_at_construction() -> None:
    with pytest.raises(PolicyError, match="max_rollbacks must be an integer >= 0"):
        Policy(max_rollbacks=-1)


def test_policy_round_trips_through_plain_values() -> None:
    policy = Policy(check_every_steps=7, lr_backoff_on=("skip", "rollback"))
    assert Policy.from_dict(policy.to_dict()) == policy


def test_every_policy_field_is_documented_with_its_default() -> None:
    from dataclasses import fields

    docs = (Path(__file__).resolve().parents[1] / "docs" / "policy.md").read_text()
    missing = [f.name for f in fields(Policy) if f"| `{f.name}` |" not in docs]
    assert not missing, f"docs/policy.md lacks {missing}"


_LOAD = ("import sys\n"
         "from nanguard.errors import PolicyError\n"
         "from nanguard.policy import Policy\n"
         "for how, path in zip(sys.argv[1::2], sys.argv[2::2]):\n"
         "    try:\n"
         "        Policy.discover(path) if how == 'discover' else Policy.from_file(path)\n"
         "        print('loaded')\n"
         "    except PolicyError as err:\n"
         "        print(err)\n")


def _load_in_a_process(*loads: tuple[str, Path]) -> list[str]:
    """The PolicyError message of each load, in one fresh process; a block fails by the timeout."""
    args = [str(item) for load in loads for item in load]
    done = subprocess.run([sys.executable, "-c", _LOAD, *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def test_policy_file_that_is_a_fifo_device_or_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO blocks in open() until a writer comes; discovery used to skip it silently (is_file()) and
    from_file to block on it. Both now refuse it, naming the file; /dev/zero and a folder likewise."""
    loads, expected = [], []
    for name in ("nanguard.toml", "pyproject.toml"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        os.mkfifo(folder / name)
        message = f"{folder / name}: is a FIFO (named pipe), not a regular policy file"
        loads += [("from_file", folder / name), ("discover", folder)]
        expected += [message, message]
        (folder / "dir").mkdir()
        (folder / "dir" / name).mkdir()
        loads.append(("discover", folder / "dir"))
        expected.append(f"{folder / 'dir' / name}: is a folder, not a regular policy file")
    loads.append(("from_file", Path("/dev/zero")))
    expected.append("/dev/zero: is a character device, not a regular policy file")
    assert _load_in_a_process(*loads) == expected


def test_policy_file_larger_than_the_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "nanguard.toml"
    with path.open("wb") as out:  # a sparse file: 4 GiB that take no disk
        out.truncate(4 << 30)
    with pytest.raises(PolicyError, match=rf"nanguard\.toml: larger than {MAX_POLICY_BYTES} bytes"):
        Policy.from_file(path)
