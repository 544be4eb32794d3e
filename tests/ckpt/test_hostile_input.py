"""Hostile and broken checkpoints: the reader refuses what a file cannot hold, before allocating it, in bounded
time, with one documented verdict; nothing hangs, nothing blows up, nothing runs."""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanguard.ckpt import Status, UnreadableCheckpoint, audit, audit_paths, find_checkpoints, read_checkpoint

CHILD_LIMIT_BYTES = 1 << 30
"""A child auditing a hostile file may grow its address space by at most 1 GiB over its baseline."""


def _audit_in_child(path: Path, timeout: float = 60) -> dict[str, str]:
    """Audit ``path`` in a fresh process whose address space is capped: a blow-up fails there, not here."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from nanguard.ckpt import audit
        size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (size + {CHILD_LIMIT_BYTES}, resource.RLIM_INFINITY))
        verdict = audit(sys.argv[1])
        print(json.dumps({{"status": verdict.status.value, "error": verdict.error or ""}}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def _rezip(src: Path, dst: Path, replace: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    """Copy the torch zip ``src`` to ``dst`` with some members replaced (same names, same order)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = replace.get(info.filename.split("/", 1)[1], zin.read(info))
            zout.writestr(info.filename, data, compress_type=compress if info.filename.endswith("data.pkl") else None)
    return dst


@pytest.fixture()
def small_zip(tmp_path: Path) -> Path:
    torch.save({"w": torch.ones(3, 3), "b": torch.zeros(3), "epoch": 2}, tmp_path / "small.pt")
    return tmp_path / "small.pt"


def test_audit_refuses_memo_index_past_the_pickle(tmp_path: Path) -> None:
    (tmp_path / "memo9.pkl").write_bytes(b"\x80\x02}r\x00\x00\x00\x10.")
    started = time.monotonic()
    result = _audit_in_child(tmp_path / "memo9.pkl")
    assert result["status"] == "unreadable" and "memo index 268435456" in result["error"], result
    assert time.monotonic() - started < 30


def test_audit_refuses_memo_index_inside_a_real_checkpoint(small_zip: Path, tmp_path: Path) -> None:
    data = zipfile.ZipFile(small_zip).read("small/data.pkl")
    at = data.index(b"q\x00")  # the first BINPUT: make it a LONG_BINPUT of 0x40000000
    patched = data[:at] + b"r" + struct.pack("<I", 0x40000000) + data[at + 2 :]
    result = _audit_in_child(_rezip(small_zip, tmp_path / "memo.pt", {"data.pkl": patched}))
    assert result["status"] == "unreadable" and "memo index 1073741824" in result["error"], result


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x8d", b"\x96"])  # BINBYTES8, BINUNICODE8, BYTEARRAY8
def test_audit_refuses_declared_length_past_the_file(tmp_path: Path, opcode: bytes) -> None:
    (tmp_path / "len.pkl").write_bytes(b"\x80\x04" + opcode + struct.pack("<Q", 1 << 40) + b"abc.")
    result = _audit_in_child(tmp_path / "len.pkl")
    assert result["status"] == "unreadable" and "declares 1099511627776 bytes" in result["error"], result


def test_audit_refuses_a_compressed_pickle_that_inflates_past_the_limit(small_zip: Path, tmp_path: Path) -> None:
    data = zipfile.ZipFile(small_zip).read("small/data.pkl")
    # The same pickle followed by 100 MB of zeros: zeros deflate ~1000x, so the file stays small.
    bomb = _rezip(small_zip, tmp_path / "bomb.pt", {"data.pkl": data + bytes(100 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1024 * 1024
    result = _audit_in_child(bomb)
    assert result["status"] == "unreadable", result
    assert "data.pkl" in result["error"] and "64 MiB" in result["error"], result


def test_compressed_storage_record_is_read_and_bounded(small_zip: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(small_zip) as zin, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    tree = read_checkpoint(tmp_path / "deflated.pt")
    assert torch.equal(tree.root["w"], torch.ones(3, 3))
    # A storage record of 128 MiB of zeros (deflates ~1000x) is refused before it is inflated.
    data = zipfile.ZipFile(small_zip).read("small/data.pkl").replace(b"K\tt", b"J\x00\x00\x00\x02t", 1)
    with zipfile.ZipFile(small_zip) as zin, zipfile.ZipFile(tmp_path / "sbomb.pt", "w") as zout:
        for info in zin.infolist():
            body = data if info.filename.endswith("data.pkl") else zin.read(info)
            if info.filename.endswith("data/0"):
                body = bytes(128 << 20)  # 32M float32 zeros, as the patched numel says
            zout.writestr(info.filename, body, compress_type=zipfile.ZIP_DEFLATED)
    result = _audit_in_child(tmp_path / "sbomb.pt")
    assert result["status"] == "unreadable" and "inflate" in result["error"], result


def test_deep_nesting_is_linear_and_refused_with_its_depth(tmp_path: Path) -> None:
    depth = 200_000
    (tmp_path / "deep.pkl").write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    started = time.monotonic()
    verdict = audit(tmp_path / "deep.pkl")
    assert time.monotonic() - started < 10
    assert verdict.status is Status.UNREADABLE and "nesting deeper than 1000 levels at 0.0.0" in (verdict.error or "")
    shallow = [[[1.0]]]
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(shallow, protocol=2))
    assert audit(tmp_path / "ok.pkl").status is Status.CLEAN


def test_crafted_module_state_gives_a_verdict_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "t.pkl"
    path.write_bytes(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}(X\x0b\x00\x00\x00_parameters}K\x01K\x02\x86K\x03ub.")
    done = subprocess.run([sys.executable, "-m", "nanguard", "audit", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode in (0, 1, 2, 3) and len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert audit(path).status in (Status.CLEAN, Status.DIRTY)


def test_numbers_too_big_for_a_float_give_a_verdict(tmp_path: Path) -> None:
    torch.save({"epoch": 10**400, "train_results": {"loss": [0.5, 10**400]}}, tmp_path / "big.pt")
    verdict = audit(tmp_path / "big.pt")
    assert verdict.status is Status.CLEAN and verdict.epoch is None, verdict


def test_one_tensor_referenced_many_times_is_judged_once(tmp_path: Path) -> None:
    # 200k more keys whose values are all one memo GET (3 bytes) of the same 1M-element tensor.
    torch.save({"w": torch.ones(1 << 20)}, tmp_path / "one.pt")
    data = zipfile.ZipFile(tmp_path / "one.pt").read("one/data.pkl")
    assert data.endswith(b"s.") and data[-4:-3] == b"q"  # ... BINPUT <tensor slot>, SETITEM, STOP
    slot = data[-3:-2]
    refs = b"".join(b"X" + struct.pack("<I", len(k)) + k + b"h" + slot + b"s"
                    for k in (str(i).encode() for i in range(200_000)))
    amplified = _rezip(tmp_path / "one.pt", tmp_path / "amp.pt", {"data.pkl": data[:-1] + refs + b"."})
    started = time.monotonic()
    verdict = audit(amplified)
    assert time.monotonic() - started < 20
    assert verdict.status is Status.CLEAN, verdict


def test_stride_zero_view_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1).expand(10)}, tmp_path / "ok.pt")
    assert audit(tmp_path / "ok.pt").status is Status.CLEAN  # a real expanded tensor stays readable
    data = zipfile.ZipFile(tmp_path / "ok.pt").read("ok/data.pkl")
    patched = data.replace(b"K\n\x85", b"J\x00\x00\x00\x40\x85", 1)  # size (10,) -> (2**30,), stride (0,)
    assert patched != data
    result = _audit_in_child(_rezip(tmp_path / "ok.pt", tmp_path / "wide.pt", {"data.pkl": patched}))
    assert result["status"] == "unreadable" and "elements" in result["error"], result


def test_symlinked_folders_are_visited_once(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    (tmp_path / "a").symlink_to(".")
    (tmp_path / "b").symlink_to(".")
    (tmp_path / "again.pt").symlink_to(tmp_path / "m.pt")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    found = find_checkpoints(tmp_path)
    assert len(found) == 1 and found[0].resolve() == (tmp_path / "m.pt").resolve(), found  # dangling: skipped
    assert [v.status for v in audit_paths([tmp_path])] == [Status.CLEAN]


def test_non_regular_files_are_unreadable_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        started = time.monotonic()
        verdict = audit(path)
        assert verdict.status is Status.UNREADABLE and "not a regular file" in (verdict.error or ""), verdict
        with pytest.raises(UnreadableCheckpoint, match="not a regular file"):
            read_checkpoint(path)
        assert time.monotonic() - started < 5


def test_nan_written_as_text_in_ultralytics_history_is_dirty(tmp_path: Path) -> None:
    import polars as pl

    csv = tmp_path / "results.csv"
    csv.write_text("epoch,train/box_loss,metrics/mAP50(B)\n1,1.5,0.1\n2,nan,0.2\n3,1.2,INF\n")
    # Exactly how Ultralytics' BaseTrainer.read_results_csv fills ckpt["train_results"].
    history = pl.read_csv(csv.read_bytes(), infer_schema_length=None).to_dict(as_series=False)
    assert history["train/box_loss"][1] == "nan"  # polars typed the column as text
    ckpt = {"epoch": 3, "best_fitness": 0.2, "train_args": {"names": {0: "nan"}, "name": "inf"},
            "train_metrics": {"metrics/mAP50(B)": "0.2", "val/loss": "-Infinity"}, "train_results": history,
            "ema": None, "model": None}
    torch.save(ckpt, tmp_path / "last.pt")
    verdict = audit(tmp_path / "last.pt")
    found = {(f.location, f.kind.value, f.first_index) for f in verdict.findings}
    assert verdict.status is Status.DIRTY, verdict
    assert found == {("train_results.train/box_loss", "nan", (1,)), ("train_results.metrics/mAP50(B)", "+inf", (2,)),
                     ("train_metrics.val/loss", "-inf", ())}, found


@contextmanager
def _address_space_cap(extra: int = 2 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra`` (soft limit), then restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text().splitlines()
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (min(size + extra, hard) if hard > 0 else size + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _assert_bounded_verdict(path: Path) -> None:
    started = time.monotonic()
    verdict = audit(path)
    assert time.monotonic() - started < 10, path
    assert verdict.status in set(Status)
    assert "MemoryError" not in (verdict.error or ""), verdict.error  # a blow-up, caught: still a failure


_OPCODES = [bytes([c]) for c in b"(.012NRbaelds}ut)oQ\x88\x89\x85\x86\x87\x81\x92\x93\x94\x8f\x90\x91]"]
_ARG_OPS = [b"J", b"K", b"M", b"G", b"h", b"j", b"q", b"r", b"\x8a", b"\x8b", b"U", b"T", b"\x8c", b"X", b"\x8d",
            b"C", b"B", b"\x8e", b"\x96", b"\x95", b"\x80"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.sampled_from(_OPCODES),
                              st.tuples(st.sampled_from(_ARG_OPS), st.binary(min_size=0, max_size=9)).map(b"".join)),
                    max_size=40))
def test_random_opcode_streams_give_a_bounded_verdict(tmp_path: Path, ops: list[bytes]) -> None:
    path = tmp_path / "fuzz.pkl"
    path.write_bytes(b"\x80\x04" + b"".join(ops) + b".")
    with _address_space_cap():
        _assert_bounded_verdict(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_torch_and_safetensors_headers_give_a_bounded_verdict(
    small_zip: Path, tmp_path: Path, data: st.DataObject
) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4), "b": torch.zeros(4)}, str(tmp_path / "s.safetensors"))
    seeds = {"zip": small_zip.read_bytes(), "pkl": zipfile.ZipFile(small_zip).read("small/data.pkl"),
             "safetensors": (tmp_path / "s.safetensors").read_bytes()}
    kind = data.draw(st.sampled_from(sorted(seeds)))
    blob = bytearray(seeds[kind])
    limit = 8 + struct.unpack("<Q", blob[:8])[0] if kind == "safetensors" else len(blob)  # mutate the header
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, limit - 1))
        blob[at : at + 1] = data.draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"9", b"[", b"-", b"r", b"\x8e"]))
    path = tmp_path / f"mutant.{ 'safetensors' if kind == 'safetensors' else 'pt'}"
    path.write_bytes(bytes(blob))
    with _address_space_cap():
        _assert_bounded_verdict(path)
