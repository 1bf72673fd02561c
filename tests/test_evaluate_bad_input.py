"""evaluate.py on bad input: corrupt images (stop or skip), broken models, malformed datasets.

Every failing run must say what is wrong and leave the output folder as it found it: no results
file for a fresh folder, the previous run's files untouched for a folder that holds them.
"""

import csv
import errno
import json
import re

import datasets
import pytest
import torch

from nearid.commands import evaluate
from nearid.hub import export_hub_folder
from nearid.metrics import NEARID_TERMS
from tests.helpers import (
    change_id,
    corrupt_image,
    drop_column,
    make_tiny_nearid,
    make_tiny_processor,
    present,
    rewrite,
    serve_as_hub_datasets,
    user_error,
)

RESULTS = "nearid_results.json"


@pytest.fixture(scope="module")
def nan_repo(tmp_path_factory):
    """A NearID model whose attention-pooling probe is NaN: every embedding it makes is NaN."""
    model = make_tiny_nearid()
    with torch.no_grad():
        model.backbone.vision_model.head.probe.fill_(float("nan"))
    return export_hub_folder(model, make_tiny_processor(), tmp_path_factory.mktemp("nan_model") / "repo")


def run_args(positives, sources, model, out, *extra):
    # A fresh store per output folder, so that every run embeds its images itself.
    args = ["nearid", "--model", str(model), "--positives", str(positives), "--output-dir", str(out),
            "--cache-dir", str(out.parent / f"cache-{out.name}"), "--batch-size", "7", *extra]
    for name, location in sources.items():
        args += ["--source", f"{name}={location}"]
    return args


def clean_sources(synthetic):
    return {"flux": synthetic / "flux", "sdxl": synthetic / "sdxl"}


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def full_row_and_slot(synthetic):
    """A row whose three views and flux distractor `nimg2` all exist, and the number of its flux
    terms anchored on that distractor (the terms a broken `nimg2` takes away)."""
    positives = datasets.load_from_disk(str(synthetic / "positives"))
    flux = datasets.load_from_disk(str(synthetic / "flux"))
    views = list(zip(*(present(positives, f"img{k}") for k in (1, 2, 3))))
    distractor = present(flux, "nimg2")
    row = next(r for r in range(len(positives)) if all(views[r]) and distractor[r])
    anchored = sum(1 for i, j, anchor in NEARID_TERMS if anchor == 1 and views[row][i] and views[row][j])
    return row, anchored


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def corrupt_flux(synthetic, tmp_path_factory):
    row, anchored = full_row_and_slot(synthetic)
    target = tmp_path_factory.mktemp("corrupt") / "flux"
    rewrite(synthetic / "flux", target, lambda d: corrupt_image(d, row, "nimg2"))
    return target, row, anchored


@pytest.fixture(scope="module")
def previous_results(synthetic, tiny_repo, tmp_path_factory):
    """An output folder holding the complete results of a clean run."""
    out = tmp_path_factory.mktemp("previous") / "out"
    evaluate.main(run_args(synthetic / "positives", clean_sources(synthetic), tiny_repo, out))
    assert (out / RESULTS).is_file()
    return out


@pytest.fixture
def output_with_previous_results(previous_results, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, content in folder_bytes(previous_results).items():
        (out / name).write_bytes(content)
    return out, folder_bytes(out)


# --- corrupt images --------------------------------------------------------------------------------


def test_corrupt_image_stops_the_run_naming_source_row_and_column(synthetic, tiny_repo, corrupt_flux, tmp_path,
                                                                  capsys):
    flux, row, _ = corrupt_flux
    sources = {"flux": flux, "sdxl": synthetic / "sdxl"}
    message = user_error(capsys, evaluate.main, run_args(synthetic / "positives", sources, tiny_repo, tmp_path / "out"))
    assert f"Could not decode source flux row {row} column nimg2" in message and "--skip-bad-images" in message
    assert not (tmp_path / "out" / RESULTS).exists()


def test_skip_bad_images_leaves_out_only_the_broken_image(synthetic, tiny_repo, corrupt_flux, previous_results,
                                                         tmp_path):
    flux, row, anchored = corrupt_flux
    assert anchored > 0  # the chosen slot takes part in some term, so skipping it must show
    sources = {"flux": flux, "sdxl": synthetic / "sdxl"}
    out = tmp_path / "out"
    evaluate.main(run_args(synthetic / "positives", sources, tiny_repo, out, "--skip-bad-images"))

    document = json.loads((out / RESULTS).read_text())
    clean = json.loads((previous_results / RESULTS).read_text())
    assert [s["image"] for s in document["skipped"]] == [f"source flux row {row} column nimg2"]
    reason = document["skipped"][0]["reason"]
    assert "Could not decode" in reason and " at 0x" not in reason  # no memory address: the same in every run
    assert document["counts"]["n_skipped"] == 1 and clean["counts"]["n_skipped"] == 0

    counts, clean_counts = document["counts"], clean["counts"]
    for key in ("per_source/flux/n_terms", "pooled_given/n_terms"):
        assert counts[key] == clean_counts[key] - anchored, key
    may_change = {"n_skipped", "skipped_by_reason"} | {
        k for k in clean_counts if k.startswith(("per_source/flux/", "pooled_given/"))}
    assert {k for k in clean_counts if counts.get(k) != clean_counts[k]} <= may_change
    assert document["metrics"]["per_source"]["sdxl"] == pytest.approx(clean["metrics"]["per_source"]["sdxl"])

    stats = document["provenance"]["extra"]["embedding"]
    assert stats["images_embedded"] == stats["unique_images"] - 1

    rows, clean_rows = read_rows(out / "nearid_per_sample.csv"), read_rows(previous_results / "nearid_per_sample.csv")
    differing = [(new, old) for new, old in zip(rows, clean_rows) if new != old]
    assert len(rows) == len(clean_rows)
    for new, old in differing:  # only float rounding elsewhere; the broken sample loses its anchored terms
        if (new["source"], int(new["row"])) == ("flux", row):
            assert int(new["n_terms"]) == int(old["n_terms"]) - anchored
        else:
            assert {**new, "min_margin": None} == {**old, "min_margin": None}
            assert float(new["min_margin"]) == pytest.approx(float(old["min_margin"]), abs=1e-6)
    assert any((new["source"], int(new["row"])) == ("flux", row) for new, _ in differing)


# --- broken model ----------------------------------------------------------------------------------


def test_non_finite_embeddings_fail_at_the_command_line_and_keep_previous_results(
        synthetic, nan_repo, output_with_previous_results, capsys):
    """The command's own exit: status 1 and the two lines of `user_errors`, no traceback (as the other user errors
    here, in this process: the tools load a NearID folder with the checkout's classes, never its remote code)."""
    out, before = output_with_previous_results
    message = user_error(capsys, evaluate.main, run_args(synthetic / "positives", clean_sources(synthetic), nan_repo,
                                                         out))
    error = message.splitlines()
    assert "non-finite embeddings" in error[0] and "--debug" in error[1] and len(error) == 2, message
    assert folder_bytes(out) == before


# --- malformed datasets ----------------------------------------------------------------------------


@pytest.mark.parametrize("which, change, message", [
    ("positives", drop_column("img3"), r"positives view columns: .*found img1, img2 but not img3.*'img2'"),
    ("flux", drop_column("nimg2"), r"distractor columns: .*nimg1\.\.nimg3; found nimg1, nimg3 but not nimg2.*'nimg3'"),
    ("sdxl", drop_column("id"), r"distractor source 'sdxl' has no 'id' column"),
    ("sdxl", change_id(4), r"'sdxl' does not match the positives at row 4: id 'someone_else'"),
])
def test_malformed_dataset_is_a_clear_error_and_keeps_previous_results(
        synthetic, tiny_repo, output_with_previous_results, tmp_path, which, change, message, capsys):
    out, before = output_with_previous_results
    locations = {"positives": synthetic / "positives", **clean_sources(synthetic)}
    locations[which] = rewrite(locations[which], tmp_path / which, change)
    positives = locations.pop("positives")
    assert re.search(message, user_error(capsys, evaluate.main, run_args(positives, locations, tiny_repo, out)))
    assert folder_bytes(out) == before


def test_empty_split_file_is_a_clear_error_and_keeps_previous_results(
        synthetic, tiny_repo, output_with_previous_results, tmp_path, capsys):
    out, before = output_with_previous_results
    split = tmp_path / "empty.json"
    split.write_text("[]")
    message = user_error(capsys, evaluate.main, run_args(synthetic / "positives", clean_sources(synthetic), tiny_repo,
                                                         out, "--split-file", str(split)))
    assert f"split file {split} is empty" in message
    assert folder_bytes(out) == before


def test_failure_while_writing_does_not_leave_previous_results_vouching_for_new_files(
        synthetic, tiny_repo, output_with_previous_results, monkeypatch, capsys):
    out, before = output_with_previous_results

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nearid.evaluation.nearid_benchmark.write_csv", full_disk)
    assert "No space left" in user_error(capsys, evaluate.main, run_args(synthetic / "positives",
                                                                         clean_sources(synthetic), tiny_repo, out))
    assert not (out / RESULTS).exists()  # the files present are a mix of two runs; none claims to be complete


def test_a_failing_plot_or_card_update_is_reported_and_the_results_are_still_written(
        synthetic, tiny_repo, tmp_path, monkeypatch, capsys):
    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    def broken_card(*args, **kwargs):
        raise ValueError("the card's front matter cannot be parsed")

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# A card\n")
    monkeypatch.setattr("nearid.reports.plots.plot_margin_histograms", no_matplotlib)
    monkeypatch.setattr("nearid.card.update_model_card", broken_card)
    # Read as Hub datasets at a recorded commit, so that the run does try to update the card.
    sources = {f"someone/nearid-mini-{name}": path for name, path in clean_sources(synthetic).items()}
    hub = serve_as_hub_datasets(monkeypatch, {"someone/nearid-mini": synthetic / "positives", **sources})
    out = tmp_path / "out"
    result = evaluate.main(run_args(hub["someone/nearid-mini"], {n: hub[f"someone/nearid-mini-{n}"] for n in
                                                              clean_sources(synthetic)}, tiny_repo, out,
                                    "--model-index", str(card)))
    document = json.loads((out / RESULTS).read_text())
    assert document["metrics"]["per_source"] == json.loads(json.dumps(result["per_source"]))
    assert [w.split(" failed")[0] for w in document["warnings"]] == [
        "plotting nearid_margins.png", f"updating the model card {card}"]
    assert "nearid_margins.png" not in {p.name for p in out.iterdir()} and (out / "nearid_ssr_pa.png").is_file()
    assert "warning: plotting nearid_margins.png failed" in capsys.readouterr().err
    assert card.read_text() == "---\nlicense: mit\n---\n# A card\n"
