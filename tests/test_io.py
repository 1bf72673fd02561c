"""nearid.io: atomic writes (complete or absent, never partial), strict JSON, CSV, disk-full errors."""

import csv
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import nearid.io
from nearid.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    explain_disk_error,
    is_disk_full,
    write_csv,
)


def test_atomic_json_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"ssr": 1.0})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"ssr": 2.0, "bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_failure_midway_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def broken_fsync(fd):  # the temp file exists and holds the new bytes when this raises
        raise OSError("disk full")

    monkeypatch.setattr(nearid.io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_writes_create_parents_and_strict_json(tmp_path):
    path = tmp_path / "a" / "b" / "r.json"
    atomic_write_json(path, {"x": np.float32(0.5), "n": np.int64(3), "nan": float("nan"),
                             "arr": np.arange(2), "p": Path("x/y")})
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"x": 0.5, "n": 3, "nan": None, "arr": [0, 1], "p": "x/y"}
    atomic_write_bytes(tmp_path / "c" / "raw.bin", b"\x00\x01")
    assert (tmp_path / "c" / "raw.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "a\r\nb")  # newlines untranslated
    assert (tmp_path / "t.txt").read_bytes() == b"a\r\nb"


def test_atomic_write_keeps_mode_of_existing_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o640




def test_per_sample_csv_round_trip(tmp_path):
    rows = [{"sample": "a/1", "source": "flux", "margin": 0.125, "win": True},
            {"sample": "b,2", "source": "sdxl", "margin": -0.5, "win": False, "note": 'said "hi"'}]
    path = write_csv(tmp_path / "sub" / "per_sample.csv", rows)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["sample", "source", "margin", "win", "note"]
    assert back == [{k: str(r.get(k, "")) for k in back[0]} for r in rows]
    assert float(back[1]["margin"]) == -0.5
    assert os.listdir(path.parent) == ["per_sample.csv"]


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib is a requirement: no skip)


def test_a_full_disk_is_named_with_the_path_and_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.bin"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nearid.io.os, "fsync", full)
    with pytest.raises(OSError, match=r"disk is full while writing .*checkpoint\.bin.*free on that disk") as error:
        atomic_write_bytes(path, b"x")
    assert error.value.errno == errno.ENOSPC and not path.exists() and os.listdir(tmp_path) == []
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert is_disk_full(torch_style) and not is_disk_full(RuntimeError("something else"))
    assert "disk is full" in str(explain_disk_error(torch_style, path))
