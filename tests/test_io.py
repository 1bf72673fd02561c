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
    recover_folder,
    replacing_folder,
    set_aside_path,
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


# --- replacing a folder -----------------------------------------------------------------------------


def folder_with(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "file.txt").write_text(text)
    return path


def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    folder = folder_with(tmp_path / "out", "old")
    (folder / "only_old.txt").write_text("x")
    with replacing_folder(folder) as staging:
        assert staging.is_dir() and staging != folder and staging.parent == folder.parent
        assert not list(staging.iterdir())
        (staging / "file.txt").write_text("new")
        assert (folder / "file.txt").read_text() == "old"  # untouched until the block ends
    assert sorted(p.name for p in folder.iterdir()) == ["file.txt"]
    assert (folder / "file.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]
    with replacing_folder(tmp_path / "a" / "new") as staging:  # no folder yet, nor its parent
        (staging / "file.txt").write_text("first")
    assert (tmp_path / "a" / "new" / "file.txt").read_text() == "first"


def test_the_old_folder_survives_a_failure_inside_the_block(tmp_path):
    folder = folder_with(tmp_path / "out", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with replacing_folder(folder) as staging:
            (staging / "file.txt").write_text("half")
            raise RuntimeError("boom")
    assert (folder / "file.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = folder_with(tmp_path / "out", "old")
    real_replace = os.replace

    def refuse_the_staging_folder(source, target):
        if Path(source).name.endswith(".partial"):
            raise PermissionError(errno.EACCES, "in use", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(nearid.io.os, "replace", refuse_the_staging_folder)
    with pytest.raises(PermissionError):
        with replacing_folder(folder) as staging:
            (staging / "file.txt").write_text("new")
    assert (folder / "file.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_leftovers_of_a_killed_run_are_cleaned_or_put_back(tmp_path, caplog):
    # Killed while writing: a half-written staging folder beside the complete one.
    folder = folder_with(tmp_path / "out", "old")
    folder_with(tmp_path / ".out.partial", "half")
    with replacing_folder(folder) as staging:
        assert not list(staging.iterdir())  # the leftover is not mixed into the new folder
        (staging / "file.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"]

    # Killed after the new folder was renamed into place, before the old one was deleted.
    folder_with(set_aside_path(folder), "older")
    with replacing_folder(folder) as staging:
        (staging / "file.txt").write_text("newer")
    assert os.listdir(tmp_path) == ["out"] and (folder / "file.txt").read_text() == "newer"

    # Killed between the two renames: the old folder set aside, none in its place. It is put back, with a warning.
    os.replace(folder, set_aside_path(folder))
    with caplog.at_level("WARNING", logger="nearid.io"):
        assert recover_folder(folder) == folder
    assert "put back" in caplog.text
    assert os.listdir(tmp_path) == ["out"] and (folder / "file.txt").read_text() == "newer"
    assert recover_folder(folder) is None  # nothing left to do

    os.replace(folder, set_aside_path(folder))
    with pytest.raises(RuntimeError):  # the next replacement recovers first, so a failure keeps the old folder
        with replacing_folder(folder):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and (folder / "file.txt").read_text() == "newer"


def test_a_full_disk_while_filling_a_folder_is_named(tmp_path):
    folder = folder_with(tmp_path / "out", "old")
    with pytest.raises(OSError, match="The disk is full while writing .*out"):
        with replacing_folder(folder):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    assert (folder / "file.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]
