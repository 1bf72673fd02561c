"""A hostile model repo runs none of its code on any load path.

The repo (tests/helpers.py `make_hostile`) says `model_type: nearid`, has valid safetensors weights,
and ships `*_nearid.py` files that write a marker when imported, an auto_map entry pointing at code
in a folder outside it, and one pointing at another Hub repo's code. evaluate.py, the Python API,
search.py and train.py load it (or train from it and resume) with this checkout's code: no marker
appears, and the numbers are those of the same weights loaded from a clean folder.
"""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nearid import IdentityScorer
from nearid.commands import evaluate, search, train
from nearid.scorers import Scorer
from tests.helpers import make_hostile, markers_written, python_path, random_pixels, train_args


@contextlib.contextmanager
def runs_no_code(markers):
    """Fail naming the model files that ran, even when the load then failed for another reason."""
    try:
        yield
    finally:
        assert markers_written(markers) == [], "the model repo's code was imported"


@pytest.fixture
def hostile(tiny_repo, tmp_path):
    return make_hostile(tiny_repo, tmp_path)


@pytest.fixture
def images(tmp_path):
    """references/<subject>/* and generations/<method>/<subject>/* with a few flat images."""
    root = tmp_path / "images"
    for folder, colors in (("references/dog", [(200, 30, 30), (190, 40, 30)]),
                           ("generations/m1/dog", [(180, 50, 40), (20, 200, 30)])):
        (root / folder).mkdir(parents=True)
        for number, color in enumerate(colors):
            image = Image.new("RGB", (40, 36), color)
            image.paste((255 - color[0], color[1], 90), (4, 4, 20, 18))
            image.save(root / folder / f"img{number}.png")
    return root


def test_the_python_api_runs_none_of_its_code_and_gives_the_clean_models_numbers(hostile, tiny_repo, images, caplog):
    folder, markers = hostile
    with runs_no_code(markers):
        vectors = IdentityScorer(str(folder), device="cpu").embed(str(images / "references" / "dog"))
    assert f"{folder} ships configuration_nearid.py, image_processing_nearid.py, modeling_nearid.py, which differ" \
        in caplog.text
    clean = IdentityScorer(str(tiny_repo), device="cpu").embed(str(images / "references" / "dog"))
    np.testing.assert_array_equal(vectors, clean)


def test_evaluate_score_runs_none_of_its_code(hostile, images, tmp_path):
    folder, markers = hostile
    with runs_no_code(markers):
        result = evaluate.main(["score", "--model", str(folder), "--references", str(images / "references"),
                                "--generations", str(images / "generations"), "--device", "cpu",
                                "--output-dir", str(tmp_path / "out")])
    assert len(result["records"]) == 2


def test_evaluate_nearid_runs_none_of_its_code(hostile, synthetic, tmp_path):
    folder, markers = hostile
    with runs_no_code(markers):
        evaluate.main(["nearid", "--model", str(folder), "--positives", str(synthetic / "positives"),
                       "--source", f"flux={synthetic / 'flux'}", "--device", "cpu",
                       "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert (tmp_path / "out" / "nearid_results.json").is_file()


def test_search_index_and_query_run_none_of_its_code(hostile, images, tmp_path):
    folder, markers = hostile
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    with runs_no_code(markers):
        search.main(["index", "--model", str(folder), "--images", str(images / "references"),
                     "--index-dir", str(tmp_path / "index"), *common])
        result = search.main(["query", "--index-dir", str(tmp_path / "index"), "--k", "1",
                              "--images", str(images / "references" / "dog" / "img0.png"),
                              "--output-dir", str(tmp_path / "out"), *common])
    assert result["records"][0]["path"] == str(images / "references" / "dog" / "img0.png")


def test_a_hub_repo_is_downloaded_without_its_code_and_run_with_ours(hostile, tiny_repo, hub, tmp_path, monkeypatch,
                                                                     caplog):
    folder, markers = hostile
    commit = "1234567890abcdef1234567890abcdef12345678"
    hub.serve("someone/hostile", folder, commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with runs_no_code(markers):
        scorer = Scorer("someone/hostile")
    # Named from the Hub's file listing: the .py files themselves are never downloaded.
    assert f"someone/hostile at commit {commit} ships configuration_nearid.py, image_processing_nearid.py, " \
        "modeling_nearid.py, which differ" in caplog.text
    assert sorted(hub.downloads()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert not [r for r in hub.requests if "other/repo" in str(r.url)]  # the auto_map's second repo is never asked
    pixels = random_pixels()
    torch.testing.assert_close(scorer.encode(pixels), Scorer(str(tiny_repo)).encode(pixels), rtol=0, atol=0)


def test_a_repo_without_safetensors_weights_is_refused(hostile):
    folder, markers = hostile
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with runs_no_code(markers), pytest.raises(FileNotFoundError, match="no safetensors weights"):
        Scorer(str(folder))


@pytest.fixture
def hostile_base(base_model, tmp_path):
    """The tiny SigLIP base model with the hostile files and auto_map beside its weights."""
    return make_hostile(base_model, tmp_path)


@pytest.mark.parametrize("base", ["hostile_base", "hostile"])
def test_training_from_a_hostile_base_and_resuming_run_none_of_its_code(train_synthetic, base, tmp_path, request):
    """From a SigLIP base, or on from a NearID model: both load with this checkout's code, and so does the resume."""
    folder, markers = request.getfixturevalue(base)
    out = tmp_path / "run"
    steps = ("--checkpointing-steps", "2", "--no-export")
    with runs_no_code(markers):
        train.main(train_args(train_synthetic, folder, out, *steps, "--max-steps", "2"))
        train.main(train_args(train_synthetic, folder, out, *steps, "--max-steps", "4",
                              "--resume-from-checkpoint", "latest"))
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 4


def test_python_started_inside_a_hostile_folder_refuses_to_import_its_code(hostile):
    folder, markers = hostile
    # `python -c` puts the working folder first on sys.path, before the installation.
    env = dict(os.environ, PYTHONPATH=python_path())
    result = subprocess.run([sys.executable, "-c", "from nearid import IdentityScorer; IdentityScorer('.')"],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert markers_written(markers) == []
    assert result.returncode != 0 and "not from this NearID installation" in result.stderr
