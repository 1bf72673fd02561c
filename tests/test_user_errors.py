"""A user's mistakes, through each command's `main`: a short message that says what was expected, what was
found and what to do, a non-zero exit, and no traceback (that is behind --debug)."""

import json
import re

import pytest

from nearid.commands import evaluate
from nearid.commands import train
from tests.helpers import train_args, user_error


def score(tiny_repo, tmp_path, *extra):
    return ["score", "--model", str(tiny_repo), "--output-dir", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), *extra]


def test_a_corrupt_image_names_it_and_suggests_skipping(synthetic, tiny_repo, tmp_path, capsys):
    samples = tmp_path / "samples"
    for side in ("src_image", "tgt_image"):
        (samples / side / "cat").mkdir(parents=True)
        (samples / side / "cat" / "0.png").write_bytes(b"garbage, not a png")
    message = user_error(capsys, evaluate.main, score(tiny_repo, tmp_path, "--samples", str(samples)))
    assert "0.png" in message and "Pass --skip-bad-images" in message


def test_a_metadata_mistake_names_the_line_and_the_path(tiny_repo, tmp_path, capsys):
    (tmp_path / "meta.csv").write_text("generated,reference\ngen.png,ref.png\n")
    message = user_error(capsys, evaluate.main, score(tiny_repo, tmp_path, "--metadata", str(tmp_path / "meta.csv")))
    assert re.search(r"meta\.csv line 2: generated image 'gen\.png' not found .*set another folder with --images",
                     message)


def test_an_unknown_method_lists_the_ones_there(synthetic, tiny_repo, tmp_path, capsys):
    message = user_error(capsys, evaluate.main, score(tiny_repo, tmp_path, "--samples",
                                                      str(synthetic / "dreambench" / "samples"), "--methods", "nope"))
    assert "nope" in message and "blip_diffusion" in message and "dreambooth_sd" in message


def test_an_unknown_flag_gets_the_closest_one(train_synthetic, base_model, tmp_path, capsys):
    message = user_error(capsys, train.main, train_args(train_synthetic, base_model, tmp_path) + ["--epochs", "3"],
                         status=2)
    assert "unrecognized arguments: --epochs 3 (did you mean --num-epochs?)" in message
    assert "--help" in message


def test_an_unreachable_hub_says_so_and_names_offline_mode_and_local_folders(synthetic, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    message = user_error(capsys, evaluate.main, ["score", "--model", "someone/nearid-elsewhere", "--samples",
                                                 str(synthetic / "dreambench" / "samples"), "--cache-dir", "cache"])
    assert "Hub is not reachable" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    message = user_error(capsys, evaluate.main, ["mtg", "--model", "m", "--mtg", "someone/mtg-elsewhere"])
    assert "cannot load the dataset 'someone/mtg-elsewhere'" in message and "HF_HUB_OFFLINE=1" in message


def test_training_offline_without_a_base_model_names_the_default_and_the_flag(train_synthetic, base_model, tmp_path,
                                                                              capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = train_args(train_synthetic, base_model, tmp_path / "out")
    at = argv.index("--base-model")
    message = user_error(capsys, train.main, argv[:at] + argv[at + 2:])
    assert "--base-model google/siglip2-so400m-patch14-384" in message and "Hub is not reachable" in message


def test_a_siglip_folder_as_the_model_suggests_the_siglip_baseline(base_model, synthetic, tmp_path, capsys):
    message = user_error(capsys, evaluate.main, ["score", "--model", str(base_model), "--samples",
                                                 str(synthetic / "dreambench" / "samples"), "--cache-dir",
                                                 str(tmp_path / "cache")])
    assert f"give it as a baseline: siglip:{base_model}" in message and "trust-remote-code" not in message


def test_a_typo_in_a_local_model_path_says_no_such_folder(synthetic, tmp_path, capsys):
    message = user_error(capsys, evaluate.main, ["score", "--model", "./models/neard", "--samples",
                                                 str(synthetic / "dreambench" / "samples"), "--cache-dir",
                                                 str(tmp_path / "cache")])
    assert "no such folder './models/neard'" in message and "Check the path" in message


def test_numbers_are_checked_when_the_command_line_is_read(capsys):
    message = user_error(capsys, evaluate.main, ["score", "--model", "m", "--samples", "s", "--batch-size", "0"],
                         status=2)
    assert "argument --batch-size: must be at least 1, got 0" in message
    message = user_error(capsys, train.main, ["--positives", "p", "--source", "a=b", "--learning-rate", "fast"],
                         status=2)
    assert "argument --learning-rate: expected a number, got 'fast'" in message


def test_an_unavailable_device_is_an_error_and_the_device_is_recorded(synthetic, tiny_repo, tmp_path, capsys):
    import torch

    samples = str(synthetic / "dreambench" / "samples")
    if not torch.cuda.is_available():
        message = user_error(capsys, evaluate.main, score(tiny_repo, tmp_path, "--samples", samples, "--device", "cuda"))
        assert "--device cuda is not available" in message and "--device cpu" in message
    evaluate.main(score(tiny_repo, tmp_path, "--samples", samples, "--device", "cpu"))
    document = json.loads((tmp_path / "out" / "score_results.json").read_text())
    assert document["scorer"]["device"] == "cpu"


@pytest.mark.parametrize("debug", ["--debug", "env"])
def test_the_traceback_is_behind_debug(tiny_repo, tmp_path, monkeypatch, debug):
    (tmp_path / "meta.csv").write_text("generated,reference\ngen.png,ref.png\n")
    args = score(tiny_repo, tmp_path, "--metadata", str(tmp_path / "meta.csv"))
    if debug == "env":
        monkeypatch.setenv("NEARID_DEBUG", "1")
    else:
        args.append("--debug")
    with pytest.raises(FileNotFoundError, match="meta.csv line 2"):
        evaluate.main(args)


@pytest.mark.parametrize("command", ["train", "evaluate", "table1", "query", "cluster", "demo", "synthetic"])
@pytest.mark.parametrize("below", [False, True])
def test_an_output_dir_that_is_a_file_says_so(command, below, tmp_path, capsys):
    import nearid.commands.synthetic
    from nearid.commands import demo, search

    file = tmp_path / "results.txt"
    file.write_text("kept")
    out = str(file / "run" if below else file)
    main, argv = {
        "train": (train.main, ["--positives", "p", "--source", "a=b"]),
        "evaluate": (evaluate.main, ["score", "--model", "m", "--samples", "s"]),
        "table1": (evaluate.main, ["table1", "--model", "m", "--positives", "p", "--source", "a=b", "--mtg", "x"]),
        "query": (search.main, ["query", "--index-dir", "i", "--images", "q"]),
        "cluster": (search.main, ["cluster", "--index-dir", "i"]),
        "demo": (demo.main, []),
        "synthetic": (nearid.commands.synthetic.main, []),
    }[command]
    message = user_error(capsys, main, [*argv, "--output-dir", out], status=2)
    assert "--output-dir" in message and f"{file} is a file" in message and "expected a folder" in message
    assert file.read_text() == "kept"
