"""The paper authors' NearID splits ship with the package and are the default for `Aleksandar/NearID`.

The Hub is replaced by in-memory datasets of the real size (19,386 rows): every view is one tiny
PNG and every distractor another, so the embed-once store computes two images whatever rows a run
reads, and which rows it read is seen in its per-sample outputs.
"""

import csv
import io
import json

import datasets
import pytest
from PIL import Image

from nearid.data import readers, split_files
from nearid.cli import apply_published_splits
from nearid.commands import evaluate, train
from nearid.resources import PUBLISHED_SPLITS
from tests.helpers import user_error

NUM_ROWS = 19_386


def png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def fake_nearid(num_rows, prefix, color):
    """`num_rows` rows with ids `row-<i>` and three image columns `<prefix>1..3` holding one image."""
    image = png(color)
    columns = {"id": [f"row-{i}" for i in range(num_rows)]}
    columns.update({f"{prefix}{k}": [image] * num_rows for k in (1, 2, 3)})
    features = datasets.Features({"id": datasets.Value("string"),
                                  **{f"{prefix}{k}": datasets.Image() for k in (1, 2, 3)}})
    return datasets.Dataset.from_dict(columns, features=features)


@pytest.fixture(scope="module")
def fake_datasets():
    return {rows: (fake_nearid(rows, "img", "red"), fake_nearid(rows, "nimg", "blue")) for rows in (NUM_ROWS, 19_000)}


@pytest.fixture
def fake_hub(fake_datasets, monkeypatch):
    """Hub ids resolve to the fake datasets: Aleksandar/NearID to positives, NearID-* to distractors. Set
    `rows` to serve another size."""
    served = {"rows": NUM_ROWS, "opened": []}

    def open_hub(source, split, revision):
        served["opened"].append(source)
        positives, distractors = fake_datasets[served["rows"]]
        return positives if source == "Aleksandar/NearID" else distractors

    monkeypatch.setattr(readers, "_open_hub", open_hub)
    return served


def ids_of(rows):
    return [f"row-{i}" for i in rows]


def per_sample_ids(path):
    with open(path, newline="") as stream:
        return list(dict.fromkeys(row["id"] for row in csv.DictReader(stream)))


def test_shipped_splits_are_disjoint_and_cover_every_row():
    splits = {name: split_files.published_split(name) for name in ("train", "val", "test")}
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 18_786, "val": 100, "test": 500}
    split_files.check_disjoint(splits)
    assert sorted(row for rows in splits.values() for row in rows) == list(range(NUM_ROWS))
    assert (PUBLISHED_SPLITS / "PROVENANCE.md").read_text().count("1a2cc718b28d8da763bd35cbe75b0ce5f0e2c73a") == 1


def test_only_nearid_positives_get_the_published_splits(tmp_path):
    mine = tmp_path / "mine.json"
    group = evaluate.RetrievalArguments(positives="Aleksandar/NearID@main", source=["flux=x"], split_file=str(mine))
    notes = apply_published_splits([group], group.positives, {"split_file": "test", "val_split_file": "val"})
    assert group.split_file == str(mine)  # a split file given is kept
    assert group.val_split_file == str(split_files.published_split_file("val")) and len(notes) == 1
    local = evaluate.RetrievalArguments(positives=str(tmp_path), source=["flux=x"])
    assert apply_published_splits([local], local.positives, {"split_file": "test", "val_split_file": "val"}) == []
    assert local.split_file is None and local.val_split_file is None


def test_nearid_mode_evaluates_the_published_test_split_by_default(fake_hub, tiny_repo, tmp_path):
    out = tmp_path / "nearid"
    result = evaluate.main(["nearid", "--model", str(tiny_repo), "--positives", "Aleksandar/NearID",
                            "--source", "flux=Aleksandar/NearID-Flux", "--cache-dir", str(tmp_path / "cache"),
                            "--output-dir", str(out)])
    assert per_sample_ids(out / "nearid_per_sample.csv") == ids_of(split_files.published_split("test"))
    assert result["pooled_given"]["n_samples"] == 500
    assert result["embedding"]["unique_images"] == 2  # one view image, one distractor image
    test_file = str(split_files.published_split_file("test"))
    assert json.loads((out / "nearid_args.json").read_text())["split_file"] == test_file
    assert json.loads((out / "nearid_results.json").read_text())["provenance"]["split_file"] == test_file


def test_retrieval_uses_the_published_test_and_val_splits(fake_hub, tiny_repo, tmp_path):
    out = tmp_path / "retrieval"
    argv = ["retrieval", "--model", str(tiny_repo), "--positives", "Aleksandar/NearID", "--source",
            "flux=Aleksandar/NearID-Flux", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]
    # Checked first: retrieval over all 19,386 rows would rank a gallery of 116,316 images against itself.
    args, _ = evaluate.parse_arguments(argv)
    apply_published_splits(args.groups.values(), args.positives, {"split_file": "test", "val_split_file": "val"})
    assert args.groups[evaluate.RetrievalArguments].split_file == str(split_files.published_split_file("test"))
    scores = evaluate.main(argv)
    assert scores["n_views"] == 3 * 500 and scores["n_distractors"] == 3 * 500
    assert "val" in scores["cluster_threshold_split"]


def test_table1_needs_no_split_file(fake_hub, tiny_repo, synthetic, tmp_path):
    out = tmp_path / "table1"
    row = evaluate.main(["table1", "--model", str(tiny_repo), "--mtg", str(synthetic / "mtg"),
                         "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)])
    assert set(fake_hub["opened"]) >= {"Aleksandar/NearID", "Aleksandar/NearID-Flux"}
    assert per_sample_ids(out / "nearid" / "nearid_per_sample.csv") == ids_of(split_files.published_split("test"))
    assert "the authors' published test split (500 rows)" in (out / "table1.md").read_text()
    assert row["nearid_ssr"] is not None


def test_train_defaults_to_the_published_splits(fake_hub, base_model, tmp_path):
    out = tmp_path / "run"
    results = train.main(["--positives", "Aleksandar/NearID", "--source", "flux=Aleksandar/NearID-Flux",
                          "--base-model", str(base_model), "--output-dir", str(out), "--num-epochs", "1",
                          "--max-steps", "1", "--per-device-batch-size", "2", "--warmup-steps", "0",
                          "--no-export", "--report-to", "none"])
    assert results["data"]["splits"] == {"train": 18_786, "val": 100, "test": 500}
    assert results["final_split"] == "test" and results["final"]["pooled"]["n_samples"] == 500
    arguments = json.loads((out / "train_args.json").read_text())
    assert str(split_files.published_split_file("test")) in json.dumps(arguments)


@pytest.mark.parametrize("command", ["nearid", "train"])
def test_another_row_count_is_refused(fake_hub, tiny_repo, base_model, tmp_path, capsys, command):
    fake_hub["rows"] = 19_000
    sources = ["--positives", "Aleksandar/NearID", "--source", "flux=Aleksandar/NearID-Flux"]
    if command == "nearid":
        main, argv = evaluate.main, ["nearid", "--model", str(tiny_repo), *sources, "--output-dir", str(tmp_path)]
    else:
        main, argv = train.main, [*sources, "--base-model", str(base_model), "--output-dir", str(tmp_path),
                                  "--num-epochs", "1", "--max-steps", "1", "--per-device-batch-size", "2", "--no-export"]
    message = user_error(capsys, main, argv)
    assert "19,386 rows" in message and "19,000 rows" in message and "Aleksandar/NearID" in message
    assert not list(tmp_path.glob("*results.json"))
