"""Checksums recorded at write and verified at read (`nearid.integrity`), and complete safetensors weights."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from nearid.commands import evaluate
from nearid.integrity import IntegrityError, check_safetensors, checksum_file, damaged, manifest
from tests.helpers import user_error


def test_a_manifest_finds_missing_truncated_and_changed_files(tmp_path):
    for name, data in (("a.bin", b"a" * 100), ("b.bin", b"b" * 100), ("c.bin", b"c" * 100), ("d.bin", b"d")):
        (tmp_path / name).write_bytes(data)
    recorded = manifest(tmp_path, ["a.bin", "b.bin", "c.bin", "d.bin"])
    assert damaged(tmp_path, recorded) == {}
    (tmp_path / "a.bin").unlink()
    (tmp_path / "b.bin").write_bytes(b"b" * 50)
    (tmp_path / "c.bin").write_bytes(b"c" * 99 + b"C")  # same size, one byte changed
    problems = damaged(tmp_path, recorded)
    assert problems["a.bin"] == "is missing"
    assert problems["b.bin"].startswith("has 50 bytes, 100 were written")
    assert "does not match the checksum" in problems["c.bin"]
    assert set(problems) == {"a.bin", "b.bin", "c.bin"}
    assert checksum_file(tmp_path / "d.bin") == recorded["d.bin"]["xxh3_128"]


def test_a_complete_safetensors_file_passes_and_a_truncated_or_garbled_one_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64), "b": torch.zeros(3)}, str(path))
    check_safetensors(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(IntegrityError, match=r"model.safetensors has \d+ bytes but its header describes \d+: it is "
                                             "truncated"):
        check_safetensors(path)
    path.write_bytes(data[:20])
    with pytest.raises(IntegrityError, match="not a readable safetensors file"):
        check_safetensors(path)


def test_a_truncated_release_model_is_a_short_error_naming_the_file(synthetic, tiny_repo, tmp_path, capsys):
    model = shutil.copytree(tiny_repo, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    samples = synthetic / "dreambench" / "samples"
    message = user_error(capsys, evaluate.main, ["score", "--model", str(model), "--samples", str(samples),
                                                 "--output-dir", str(tmp_path / "out")])
    assert f"{weights} has" in message and "truncated" in message, message
