"""evaluate.py end to end on the synthetic benchmark and on the published DreamBench++ score files."""

import csv
import json

from nearid.commands import evaluate
from nearid.evaluation import table1
from tests.helpers import REPO_ROOT, user_error

RATINGS = REPO_ROOT / "tests" / "data" / "dreambench_plus"


def nearid_args(synthetic, tiny_repo, out, cache):
    return ["nearid", "--model", str(tiny_repo), "--positives", str(synthetic / "positives"),
            "--source", f"flux={synthetic / 'flux'}", "--source", f"sdxl={synthetic / 'sdxl'}",
            "--output-dir", str(out), "--cache-dir", str(cache), "--batch-size", "7"]


def test_nearid_end_to_end_and_rerun_without_forwards(synthetic, tiny_repo, tmp_path):
    first = evaluate.main(nearid_args(synthetic, tiny_repo, tmp_path / "a", tmp_path / "cache"))
    assert first["embedding"]["forward_passes"] > 0
    assert first["embedding"]["images_embedded"] == first["embedding"]["unique_images"]
    second = evaluate.main(nearid_args(synthetic, tiny_repo, tmp_path / "b", tmp_path / "cache"))
    assert second["embedding"]["forward_passes"] == 0 and second["embedding"]["images_embedded"] == 0
    assert second["per_source"] == first["per_source"]

    out = tmp_path / "b"
    files = {"nearid_args.json", "nearid_table.md", "nearid_per_sample.csv", "nearid_margins.png", "nearid_ssr_pa.png"}
    assert {p.name for p in out.iterdir()} == files | {"nearid_results.json"}
    document = json.loads((out / "nearid_results.json").read_text())
    assert set(document["files"]) == files and document["warnings"] == []
    arguments = json.loads((out / "nearid_args.json").read_text())
    assert arguments["command"] == "evaluate.py nearid" and arguments["batch_size"] == 7
    assert arguments["source"] == [f"flux={synthetic / 'flux'}", f"sdxl={synthetic / 'sdxl'}"]
    assert document["provenance"]["extra"]["embedding"]["forward_passes"] == 0
    assert document["provenance"]["model"]["kind"] == "nearid"
    with open(out / "nearid_per_sample.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["source"] == "flux"]
    flux = document["metrics"]["per_source"]["flux"]
    assert sum(int(r["n_terms"]) for r in rows) == flux["n_terms"]
    assert sum(int(r["n_wins"]) for r in rows) == flux["n_wins"]
    assert len(rows) == 10 and flux["n_samples"] == 10


def test_nearid_split_file_selects_rows(synthetic, tiny_repo, tmp_path):
    args = nearid_args(synthetic, tiny_repo, tmp_path / "out", tmp_path / "cache")
    result = evaluate.main(args + ["--split-file", str(synthetic / "splits" / "train.json")])
    expected = len(json.loads((synthetic / "splits" / "train.json").read_text()))
    assert result["per_source"]["flux"]["n_samples"] == expected


def test_nearid_mismatched_source_fails_and_writes_nothing(synthetic, tiny_repo, tmp_path, capsys):
    from datasets import load_from_disk

    shuffled = load_from_disk(str(synthetic / "flux")).select(list(range(9, -1, -1)))
    shuffled.save_to_disk(str(tmp_path / "shuffled"))
    args = nearid_args(synthetic, tiny_repo, tmp_path / "out", tmp_path / "cache")
    args[args.index(f"flux={synthetic / 'flux'}")] = f"flux={tmp_path / 'shuffled'}"
    assert "does not match the positives at row 0" in user_error(capsys, evaluate.main, args)
    assert not (tmp_path / "out").exists()


def test_dreambench_mh_from_published_score_files(tmp_path):
    result = evaluate.main(["dreambench", "--ratings", str(RATINGS), "--scores-from", "data_nearid_rating",
                            "--output-dir", str(tmp_path)])
    assert round(result["mh_object"], 3) == 0.545
    assert "| score files data_nearid_rating |" in (tmp_path / "dreambench_table.md").read_text()


def test_dreambench_reports_the_authors_all_category_figure_apart_from_the_pooled_one(tmp_path):
    evaluate.main(["dreambench", "--ratings", str(RATINGS), "--scores-from", "data_nearid_rating",
                   "--output-dir", str(tmp_path)])
    document = json.loads((tmp_path / "dreambench_results.json").read_text())
    assert round(document["metrics"]["mh_all_categories"], 3) == 0.445
    assert round(document["metrics"]["mh_pooled_prompts"], 3) == 0.407
    assert "mh_all" not in document["metrics"]
    assert "Fisher-z mean of the four category" in document["notes"]["mh_all_categories"]
    assert "not meaningful" in document["notes"]["mh_pooled_prompts"]
    table = (tmp_path / "dreambench_table.md").read_text()
    assert "All categories: 0.445" in table and "Pooled over all prompts: 0.407" in table


def test_model_index_is_not_given_results_measured_on_local_data(tmp_path, capsys):
    # The rating files are a local folder: a model-index entry would claim a result on the Hub dataset.
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# A model\n")
    result = evaluate.main(["dreambench", "--ratings", str(RATINGS), "--scores-from", "data_nearid_rating",
                            "--output-dir", str(tmp_path / "out"), "--model-index", str(card)])
    assert card.read_text() == "---\nlicense: apache-2.0\n---\n# A model\n"
    warnings = json.loads((tmp_path / "out" / "dreambench_results.json").read_text())["warnings"]
    assert len(warnings) == 1 and "not updated" in warnings[0] and "not read from the Hub" in warnings[0]
    assert f"warning: {warnings[0]}" in capsys.readouterr().err
    assert round(result["mh_object"], 3) == 0.545  # the results themselves are all there


def test_dreambench_from_images_writes_published_score_format(synthetic, tiny_repo, tmp_path):
    samples, ratings = synthetic / "dreambench" / "samples", synthetic / "dreambench" / "ratings"
    evaluate.main(["dreambench", "--ratings", str(ratings), "--samples", str(samples), "--model", str(tiny_repo),
                   "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    methods = sorted(p.name for p in samples.iterdir())
    for method in methods:
        scores = json.loads((tmp_path / "dreambench_scores" / f"{method}.json").read_text())
        human = json.loads((ratings / "data_human_rating" / "merged_data" / "group1" / f"{method}-cp.json").read_text())
        assert {k.rsplit("_", 1)[0] for k in scores} == set(human)
        assert all(-100.0 <= v <= 100.0 for v in scores.values())
    document = json.loads((tmp_path / "dreambench_results.json").read_text())
    assert document["scorer"]["embedding"]["forward_passes"] > 0


def test_bad_or_repeated_source_arguments_are_refused(capsys):
    base = ["nearid", "--model", "m", "--positives", "p"]
    assert "NAME=SRC" in user_error(capsys, evaluate.main, base + ["--source", "flux"])
    message = user_error(capsys, evaluate.main, base + ["--source", "flux=A", "--source", "flux=B"])
    assert "names 'flux' twice" in message


def test_table1_runs_every_benchmark_and_prints_the_row_beside_the_papers(synthetic, tiny_repo, tmp_path):
    out, cache = tmp_path / "table1", tmp_path / "cache"
    args = ["table1", "--model", str(tiny_repo), "--positives", str(synthetic / "positives"),
            "--source", f"flux={synthetic / 'flux'}", "--source", f"sdxl={synthetic / 'sdxl'}",
            "--split-file", str(synthetic / "splits" / "test.json"), "--mtg", str(synthetic / "mtg"),
            "--ratings", str(synthetic / "dreambench" / "ratings"), "--samples", str(synthetic / "dreambench" / "samples"),
            "--output-dir", str(out), "--cache-dir", str(cache)]
    row = evaluate.main(args)
    nearid = evaluate.main(nearid_args(synthetic, tiny_repo, tmp_path / "nearid", cache)
                           + ["--split-file", str(synthetic / "splits" / "test.json")])
    assert (row["nearid_ssr"], row["nearid_pa"]) == (nearid["pooled_given"]["ssr"], nearid["pooled_given"]["pa"])
    assert all(key in row for key in ("mtg_mo", "mtg_pa", "dreambench_mh"))
    table = (out / "table1.md").read_text()
    assert "| NearID SSR\u2020 |" in table and "\u2020 pooled over the distractor sources flux, sdxl, not Table 1" in table
    assert "| NearID (paper) | 99.17 | 99.71 | 0.465 | 0.486 | 35.00 | 46.50 | 0.545 |" in table
    assert f"the rows of {synthetic / 'splits' / 'test.json'}" in table
    assert {p.name for p in out.iterdir()} >= {"table1.md", "table1_results.json", "nearid", "mtg", "dreambench"}


def test_table1_says_which_rows_the_nearid_columns_use():
    from nearid.reports.tables import table1_markdown

    seven = ["flux", "flux_1024", "powerpaint", "sdxl", "sdxl_1024", "qwen", "qwen_1328"]
    assert "\u2020" not in table1_markdown({"m": {}}, nearid_sources=seven)
    assert "\u2020 pooled over the distractor sources flux" in table1_markdown({"m": {}}, nearid_sources=["flux"])


def object_only_ratings(folder):
    """The published rating files cut down to the object category (no style, animal or human samples)."""
    for source in [*RATINGS.glob("data_nearid_rating/*.json"), *RATINGS.glob("data_human_rating/merged_data/*/*")]:
        target = folder / source.relative_to(RATINGS)
        target.parent.mkdir(parents=True, exist_ok=True)
        scores = json.loads(source.read_text())
        target.write_text(json.dumps({k: v for k, v in scores.items() if k.startswith("object_")}))
    return folder


def test_dreambench_categories_without_samples_say_so_instead_of_nan(tmp_path, capsys):
    ratings = object_only_ratings(tmp_path / "ratings")
    result = evaluate.main(["dreambench", "--ratings", str(ratings), "--scores-from", "data_nearid_rating",
                            "--output-dir", str(tmp_path / "out")])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("MH per category"))
    assert "nan" not in line
    assert f"object {result['mh_object']:.4f}" in line
    assert all(f"{category} no samples" in line for category in ("style", "live_subject_animal", "live_subject_human"))


def test_table1_labels_this_runs_row_by_its_data(synthetic, tmp_path):
    from nearid.data import readers

    assert readers.data_origin(synthetic / "positives") == "synthetic"
    assert readers.data_origin(synthetic / "dreambench" / "samples") == "synthetic"
    assert readers.data_origin(tmp_path) == "local" and readers.data_origin("Aleksandar/NearID") == "hub"
    args, _ = evaluate.parse_arguments([
        "table1", "--model", "my-model", "--positives", str(synthetic / "positives"),
        "--source", f"flux={synthetic / 'flux'}", "--mtg", str(synthetic / "mtg"), "--output-dir", str(tmp_path)])
    table1.write_outputs(args, {"nearid_ssr": 50.0}, ["flux"])
    table = (tmp_path / "table1.md").read_text()
    assert "| my-model (this run, synthetic data) | 50.00 |" in table
    assert "this run's row is on synthetic data" in table and "| NearID (paper) |" in table
    args.mtg = "abdo-eldesokey/mtg-dataset"  # the Hub's MTG beside synthetic NearID data: both named
    table1.write_outputs(args, {"nearid_ssr": 50.0}, ["flux"])
    assert "| my-model (this run, synthetic data + Hub data) |" in (tmp_path / "table1.md").read_text()
