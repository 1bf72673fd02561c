"""train.py on bad input: a corrupt training image (stop before training, or skip it), malformed datasets.

A failing run must name what is wrong and leave no checkpoint, release or results behind.
"""

import json
import re

import datasets
import pytest

from nearid.commands import train
from nearid import checkpoints
from tests.helpers import change_id, corrupt_image, drop_column, logged_losses, present, rewrite, user_error


def run_args(train_synthetic, base_model, out, *extra, flux=None, positives=None):
    """A short run with one distractor source, so that every present distractor is drawn each epoch;
    `flux` and `positives` replace the synthetic datasets."""
    return ["--positives", str(positives or train_synthetic / "positives"), "--source", f"flux={flux or train_synthetic / 'flux'}",
            "--test-split", str(train_synthetic / "splits" / "test.json"), "--base-model", str(base_model),
            "--output-dir", str(out), "--per-device-batch-size", "4", "--num-epochs", "1", "--warmup-steps", "1",
            "--log-steps", "1", "--batch-size", "16", *extra]


def assert_nothing_trained(out):
    assert not checkpoints.completed(out)
    assert not (out / "checkpoints").exists() and not (out / "release").exists()
    assert not (out / "train_results.json").exists()
    assert not (out / "logs.jsonl").exists() or not logged_losses(out)


def used_distractor(train_synthetic, split):
    """(row, column) of a flux distractor that a run uses: its view is present in a row of `split`
    ("train": rows outside the test split) that has at least two views."""
    positives = datasets.load_from_disk(str(train_synthetic / "positives"))
    flux = datasets.load_from_disk(str(train_synthetic / "flux"))
    test_rows = set(json.loads((train_synthetic / "splits" / "test.json").read_text()))
    rows = sorted(test_rows) if split == "test" else [r for r in range(len(positives)) if r not in test_rows]
    views = list(zip(*(present(positives, f"img{k}") for k in (1, 2, 3))))
    distractors = list(zip(*(present(flux, f"nimg{k}") for k in (1, 2, 3))))
    return next((row, f"nimg{k + 1}") for row in rows if sum(views[row]) >= 2
                for k in range(3) if views[row][k] and distractors[row][k])


def corrupt_flux(train_synthetic, split, target):
    """A copy of the flux source with one image of `split` corrupt; (copy, row, column)."""
    row, column = used_distractor(train_synthetic, split)
    rewrite(train_synthetic / "flux", target, lambda d: corrupt_image(d, row, column))
    return target, row, column


@pytest.fixture(scope="module")
def corrupt_training_image(train_synthetic, tmp_path_factory):
    return corrupt_flux(train_synthetic, "train", tmp_path_factory.mktemp("corrupt_train") / "flux")


@pytest.fixture(scope="module")
def corrupt_test_image(train_synthetic, tmp_path_factory):
    return corrupt_flux(train_synthetic, "test", tmp_path_factory.mktemp("corrupt_test") / "flux")


@pytest.fixture(scope="module")
def clean_run(train_synthetic, base_model, tmp_path_factory):
    return train.main(run_args(train_synthetic, base_model, tmp_path_factory.mktemp("clean") / "run",
                               "--skip-bad-images"))


def test_corrupt_training_image_stops_before_training(train_synthetic, base_model, corrupt_training_image,
                                                      tmp_path, capsys):
    flux, row, column = corrupt_training_image
    where = f"source flux row {row} column {column}"
    out = tmp_path / "run"
    message = user_error(capsys, train.main, run_args(train_synthetic, base_model, out, flux=flux))
    assert f"Could not decode {where} (" in message and "--skip-bad-images" in message
    assert_nothing_trained(out)


def test_skip_bad_images_trains_without_the_image(train_synthetic, base_model, corrupt_training_image,
                                                  clean_run, tmp_path):
    flux, row, column = corrupt_training_image
    where = f"source flux row {row} column {column}"
    out = tmp_path / "run"
    skipped = train.main(run_args(train_synthetic, base_model, out, "--skip-bad-images", flux=flux))

    on_disk = json.loads((out / "train_results.json").read_text())
    assert list(on_disk["skipped_images"]) == [where]
    assert "Could not decode" in on_disk["skipped_images"][where]
    assert clean_run["skipped_images"] == {}
    assert skipped["global_step"] == clean_run["global_step"] > 0
    assert (out / "release" / "model.safetensors").is_file()

    counts, clean_counts = on_disk["data"], clean_run["data"]
    assert counts["dropped_images"] == 1 and clean_counts["dropped_images"] == 0
    assert counts["images"] == clean_counts["images"] - 1
    # With one source, the view whose only distractor was dropped now has none.
    assert counts["nearid_views_without_distractor"] == clean_counts["nearid_views_without_distractor"] + 1
    assert counts["samples"] == clean_counts["samples"]


def test_skipped_held_out_image_is_scored_as_missing(train_synthetic, base_model, corrupt_test_image, clean_run,
                                                     tmp_path):
    flux, row, column = corrupt_test_image
    where = f"source flux (test split) row {row} column {column}"
    results = train.main(run_args(train_synthetic, base_model, tmp_path / "run", "--skip-bad-images", flux=flux))
    assert list(results["skipped_images"]) == [where]
    assert results["data"]["dropped_images"] == 0  # not a training image
    final, clean_final = results["final"]["pooled"], clean_run["final"]["pooled"]
    assert final["n_samples"] == clean_final["n_samples"]
    assert 0 < final["n_terms"] < clean_final["n_terms"]  # the terms anchored on the broken distractor are gone


@pytest.mark.parametrize("which, change, message", [
    ("flux", change_id(4), r"'flux' does not match the positives at row 4: id 'someone_else'"),
    ("flux", drop_column("id"), r"distractor source 'flux' has no 'id' column"),
    ("flux", drop_column("nimg2"), r"distractor columns: .*nimg1\.\.nimg3; found nimg1, nimg3 but not nimg2"),
    ("positives", drop_column("img3"), r"positives view columns: .*img1\.\.img3.*found img1, img2 but not img3"),
])
def test_malformed_dataset_is_a_clear_error(train_synthetic, base_model, tmp_path, which, change, message, capsys):
    changed = rewrite(train_synthetic / which, tmp_path / which, change)
    out = tmp_path / "run"
    assert re.search(message, user_error(capsys, train.main, run_args(train_synthetic, base_model, out,
                                                                      **{which: changed})))
    assert_nothing_trained(out)
