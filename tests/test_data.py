"""Tests of nearid_data: opening local and Hub sources, view/distractor columns, the by-index join,
split files, encoded images (hashing without decoding, clear decode errors), MTG and DreamBench++."""

import io
import json
import logging
import shutil

import datasets
import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Value, load_from_disk
from datasets import Image as HFImage
from PIL import Image

from nearid import metrics
from nearid.cli import DatasetSource
from nearid.commands import synthetic as syn
from nearid.data import dreambench_files, nearid_benchmark, readers, split_files
from nearid.images import load_image
from nearid.metrics import dreambench_key
from nearid.synthetic import builders

SMALL = ["--num-identities", "6", "--image-size", "32", "--mtg-train", "2", "--mtg-test", "3",
         "--dreambench-subjects", "2", "--dreambench-prompts", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    syn.main(["--output-dir", str(out), *SMALL])
    return out


pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest.py


@pytest.fixture(scope="module")
def positives(root):
    return load_from_disk(str(root / "positives"))


@pytest.fixture(scope="module")
def sources(root):
    return {name: load_from_disk(str(root / name)) for name in ("flux", "sdxl")}


def png_bytes(colour, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(cells, column="img1", ids=None):
    """A tiny Dataset with one Image column holding raw encoded `cells` (bytes or None)."""
    ids = ids or [f"r{i}" for i in range(len(cells))]
    features = Features({"id": Value("string"), column: HFImage()})
    return Dataset.from_dict({"id": ids, column: [None if c is None else {"bytes": c, "path": None} for c in cells]},
                             features=features)


def ids(dataset):
    return list(dataset.select_columns(["id"])["id"])


# --------------------------------------------------------------------------------------------------
# open_dataset: local formats


def test_open_save_to_disk_dataset(root, positives):
    dataset, prov = readers.open_dataset(str(root / "positives"))
    assert ids(dataset) == ids(positives)
    assert prov == {"kind": "local", "source": str((root / "positives").resolve()), "format": "save_to_disk",
                    "split": None, "revision": None, "commit": None, "fingerprint": dataset._fingerprint,
                    "num_rows": 6}


def test_open_dataset_dict_picks_split_and_names_available(root):
    test, prov = readers.open_dataset(str(root / "mtg"), split="test")
    train, _ = readers.open_dataset(str(root / "mtg"), split="train")
    assert (len(test), len(train), prov["split"]) == (3, 2, "test")
    with pytest.raises(ValueError, match=r"'validation'.*available splits: \['test', 'train'\]"):
        readers.open_dataset(str(root / "mtg"), split="validation")


def test_open_parquet_file_and_folders(positives, tmp_path):
    positives.to_parquet(str(tmp_path / "one.parquet"))
    dataset, prov = readers.open_dataset(str(tmp_path / "one.parquet"))
    assert ids(dataset) == ids(positives) and prov["format"] == "parquet" and prov["split"] is None
    assert isinstance(dataset.features["img1"], HFImage)  # features survive the parquet round trip
    (tmp_path / "flat").mkdir()
    positives.select(range(3)).to_parquet(str(tmp_path / "flat" / "a.parquet"))
    positives.select(range(3, 6)).to_parquet(str(tmp_path / "flat" / "b.parquet"))
    dataset, _ = readers.open_dataset(str(tmp_path / "flat"))
    assert sorted(ids(dataset)) == sorted(ids(positives))
    (tmp_path / "hub" / "data").mkdir(parents=True)  # a local clone of a Hub dataset repo
    positives.select(range(4)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    positives.select([4, 5]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    dataset, prov = readers.open_dataset(str(tmp_path / "hub"), split="test")
    assert ids(dataset) == ids(positives)[4:] and prov["split"] == "test"
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        readers.open_dataset(str(tmp_path / "hub"), split="val")


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset.*save_to_disk folder"):
        readers.open_dataset(str(tmp_path / "missing" / "positives"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown dataset format.*notes.txt.*not .parquet"):
        readers.open_dataset(str(tmp_path / "notes.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(png_bytes("red"))
    with pytest.raises(ValueError, match=r"unknown dataset format in folder.*\['image.png'\]"):
        readers.open_dataset(str(tmp_path / "folder"))
    image_dataset([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="has no rows"):
        readers.open_dataset(str(tmp_path / "empty"))
    image_dataset([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="has no rows"):
        readers.open_dataset(str(tmp_path / "empty.parquet"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet is not a readable parquet file"):
        readers.open_dataset(str(tmp_path / "fake.parquet"))


# --------------------------------------------------------------------------------------------------
# open_dataset: Hub ids (datasets.load_dataset is replaced at the datasets boundary)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_dict({"id": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_id_goes_to_load_dataset(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like the id exists here
    dataset, prov = readers.open_dataset("someone/nearid-missing", split="test", revision="abc123")
    assert fake_hub == [(("someone/nearid-missing",), {"split": "test", "revision": "abc123"})]
    assert ids(dataset) == ["a", "b"]
    assert prov == {"kind": "hub", "source": "someone/nearid-missing", "format": "hub", "split": "test",
                    "revision": "abc123", "commit": None, "fingerprint": dataset._fingerprint, "num_rows": 2}


def test_a_hub_dataset_records_the_commit_it_was_read_at(tmp_path, monkeypatch):
    # datasets keeps a Hub dataset's arrow files in a cache folder named by the commit it resolved.
    commit = "0123456789abcdef0123456789abcdef01234567"
    Dataset.from_dict({"id": ["a", "b"]}).save_to_disk(str(tmp_path / "cache" / commit))
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: datasets.load_from_disk(str(tmp_path / "cache" / commit)))
    monkeypatch.chdir(tmp_path)
    assert readers.open_dataset("someone/nearid")[1]["commit"] == commit
    assert readers.open_dataset("someone/nearid", revision="f" * 40)[1]["commit"] == "f" * 40  # a commit asked for
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: Dataset.from_dict({"id": ["a"]}))
    assert readers.open_dataset("someone/nearid", revision="main")[1]["commit"] is None  # in memory: unknown


def test_local_paths_never_go_to_the_hub(fake_hub, tmp_path, monkeypatch, positives):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "./nope", "some/deep/nope", "nope.parquet"):
        with pytest.raises(FileNotFoundError, match="no such dataset"):
            readers.open_dataset(path)
    positives.save_to_disk(str(tmp_path / "someone" / "nearid"))  # an existing folder wins over the Hub
    _, prov = readers.open_dataset("someone/nearid")
    assert prov["kind"] == "local" and fake_hub == []


def test_hub_not_found_says_neither_local_nor_hub(monkeypatch, tmp_path):
    def load_dataset(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'someone/x' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no local folder.*doesn't exist on the Hub.*HF_HUB_OFFLINE"):
        readers.open_dataset("someone/x")


def test_an_unreachable_hub_says_so_and_names_local_copies(monkeypatch, tmp_path):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Couldn't reach.*local copy.*HF_HUB_OFFLINE=1"):
        readers.open_dataset("someone/x")


def test_a_revision_pins_a_hub_dataset_and_is_refused_for_a_local_path(fake_hub, tmp_path, monkeypatch, positives):
    monkeypatch.chdir(tmp_path)
    readers.open_dataset(DatasetSource.parse("someone/nearid@v1.0"), split="train")
    assert fake_hub[-1] == (("someone/nearid",), {"split": "train", "revision": "v1.0"})
    positives.save_to_disk(str(tmp_path / "local"))
    with pytest.raises(ValueError, match="applies to Hub datasets.*local path"):
        readers.open_dataset(str(tmp_path / "local"), revision="v1.0")
    at_sign = tmp_path / "copy@2"  # an existing folder keeps its '@'
    positives.save_to_disk(str(at_sign))
    assert DatasetSource.parse(str(at_sign)) == DatasetSource(str(at_sign))


# --------------------------------------------------------------------------------------------------
# Columns and the join


def test_view_columns_accepts_both_namings_and_says_which(positives, caplog):
    with caplog.at_level(logging.INFO, logger="nearid.data.nearid_benchmark"):
        assert nearid_benchmark.view_columns(positives) == ("img1", "img2", "img3")
        renamed = positives.rename_columns({f"img{k}": f"images{k}" for k in (1, 2, 3)})
        assert nearid_benchmark.view_columns(renamed) == ("images1", "images2", "images3")
    assert "dataset-card naming 'img'" in caplog.text and "reference-code naming 'images'" in caplog.text


def test_view_columns_errors_list_the_columns(positives):
    with pytest.raises(ValueError, match=r"img1\.\.img3 or images1\.\.images3; found img1, img2 but not img3.*'cat"):
        nearid_benchmark.view_columns(positives.remove_columns(["img3"]))
    both = positives.add_column("images1", [None] * 6).add_column("images2", [None] * 6)
    with pytest.raises(ValueError, match="more than one of"):
        nearid_benchmark.view_columns(both.add_column("images3", [None] * 6))


def test_distractor_columns(sources, positives):
    assert nearid_benchmark.distractor_columns(sources["flux"]) == ("nimg1", "nimg2", "nimg3")
    with pytest.raises(ValueError, match=r"nimg1\.\.nimg3.*'img1'"):
        nearid_benchmark.distractor_columns(positives)


def test_join_sources_and_select_keep_alignment(positives, sources):
    bench = nearid_benchmark.join_sources(positives, sources)
    assert len(bench) == 6 and bench.view_columns == ("img1", "img2", "img3")
    assert bench.distractor_columns == {"flux": ("nimg1", "nimg2", "nimg3"), "sdxl": ("nimg1", "nimg2", "nimg3")}
    picked = bench.select([4, 1])
    assert ids(picked.positives) == ids(picked.sources["flux"]) == ids(picked.sources["sdxl"])
    assert ids(picked.positives) == [ids(positives)[4], ids(positives)[1]]


def test_join_refuses_id_mismatch_naming_first_bad_row(positives, sources):
    shuffled = sources["sdxl"].select([0, 1, 3, 2, 5, 4])
    all_ids = ids(positives)
    with pytest.raises(ValueError, match=rf"'sdxl'.*row 2: id '{all_ids[3]}' vs positives id '{all_ids[2]}'"):
        nearid_benchmark.join_sources(positives, {"flux": sources["flux"], "sdxl": shuffled})


def test_join_refuses_length_mismatch(positives, sources):
    with pytest.raises(ValueError, match="'flux' has 5 rows but positives have 6"):
        nearid_benchmark.join_sources(positives, {"flux": sources["flux"].select(range(5))})
    with pytest.raises(ValueError, match="at least one"):
        nearid_benchmark.join_sources(positives, {})
    with pytest.raises(ValueError, match="no 'id' column"):
        nearid_benchmark.join_sources(positives, {"flux": sources["flux"].remove_columns(["id"])})


def test_join_reads_ids_without_decoding_images(positives, sources):
    corrupt = image_dataset([b"not an image"] * 6, column="nimg1", ids=ids(positives))
    corrupt = corrupt.add_column("nimg2", [None] * 6).add_column("nimg3", [None] * 6)
    assert nearid_benchmark.join_sources(positives, {"broken": corrupt}).distractor_columns["broken"][0] == "nimg1"


def test_open_benchmark(root):
    bench, prov = nearid_benchmark.open_benchmark(str(root / "positives"), {"flux": str(root / "flux")})
    assert set(prov) == {"positives", "flux"} and prov["flux"]["num_rows"] == len(bench) == 6


# --------------------------------------------------------------------------------------------------
# Split files


def test_split_files_of_the_synthetic_build(root, positives):
    splits = {name: split_files.load_split_indices(root / "splits" / f"{name}.json", num_rows=6)
              for name in ("train", "val", "test")}
    assert sorted(sum(splits.values(), [])) == list(range(6))
    split_files.check_disjoint(splits)
    assert ids(split_files.select_rows(positives, splits["test"])) == [ids(positives)[i] for i in splits["test"]]


def test_split_file_object_form_and_overlap(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"indices": [3, 0], "note": "kept order"}))
    assert split_files.load_split_indices(tmp_path / "s.json", num_rows=4) == [3, 0]
    with pytest.raises(ValueError, match="'train' and 'test' share 1 rows.*first: 3"):
        split_files.check_disjoint({"train": [0, 3], "test": [3, 5]})


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 1]", "row index 1 appears more than once"),
    ("[0, 6]", "row index 6 is out of range for a dataset of 6 rows"),
    ("[]", "is empty"),
    ('{"rows": [1]}', "holds a dict; expected a JSON list"),
    ('"0,1"', "holds a str"),
    ("[0, -1]", "non-negative integers, found -1"),
    ("[0, 1.0]", "non-negative integers, found 1.0"),
    ("[true]", "non-negative integers, found True"),
    ("[0, 1", "not valid JSON"),
])
def test_split_file_validation(tmp_path, content, message):
    (tmp_path / "split.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        split_files.load_split_indices(tmp_path / "split.json", num_rows=6)


def test_split_file_missing_and_select_rows_range(tmp_path, positives):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        split_files.load_split_indices(tmp_path / "none.json")
    with pytest.raises(ValueError, match="out of range"):
        split_files.select_rows(positives, [0, 6])


# --------------------------------------------------------------------------------------------------
# Encoded images


def test_image_refs_are_encoded_and_missing_stays_none(positives):
    two_view = [i for i, n in enumerate(positives["n_images"]) if n == 2]
    three_view = [i for i, n in enumerate(positives["n_images"]) if n == 3]
    assert two_view and three_view
    refs = readers.image_refs(positives, "img3", [three_view[0], two_view[0], three_view[-1]])
    assert refs[1] is None and isinstance(refs[0]["bytes"], bytes) and set(refs[0]) == {"bytes", "path"}
    decoded = load_image(refs[0], name=f"positives row {three_view[0]} column img3")
    expected = positives.select_columns(["img3"])[three_view[0]]["img3"]
    assert np.array_equal(np.asarray(decoded), np.asarray(expected.convert("RGB")))
    assert readers.image_ref(positives, "img3", two_view[0]) is None


def test_undecoded_turns_off_decoding(positives):
    raw = readers.undecoded(positives)
    assert [raw.features[f"img{k}"].decode for k in (1, 2, 3)] == [False] * 3
    assert positives.features["img1"].decode  # the input is left alone
    with pytest.raises(ValueError, match="'id' is not an image column"):
        readers.undecoded(positives, ["id"])


# --------------------------------------------------------------------------------------------------
# MTG and DreamBench++


def test_open_mtg_checks_columns(root, tmp_path):
    assert readers.MTG_COLUMNS is builders.MTG_COLUMNS and len(readers.MTG_COLUMNS) == 8  # one schema, read and written
    assert builders.DREAMBENCH_CATEGORIES is metrics.DREAMBENCH_CATEGORIES
    dataset, prov = readers.open_mtg(str(root / "mtg"))
    assert len(dataset) == 3 and prov["split"] == "test"
    mtg = load_from_disk(str(root / "mtg"))
    DatasetDict({"test": mtg["test"].remove_columns(["image_2_part_mask", "image_1_inpainted"])}).save_to_disk(
        str(tmp_path / "partial"))
    with pytest.raises(ValueError, match=r"lacks columns \['image_1_inpainted', 'image_2_part_mask'\]"):
        readers.open_mtg(str(tmp_path / "partial"))


def test_dreambench_pairs_match_the_rating_keys(root):
    samples = root / "dreambench" / "samples"
    assert dreambench_files.dreambench_methods(samples) == ["blip_diffusion", "dreambooth_sd"]
    pairs = dreambench_files.dreambench_pairs(samples, "blip_diffusion")
    oracle = json.loads((root / "dreambench" / "ratings" / "data_synthetic_oracle_rating" / "blip_diffusion.json")
                        .read_text())
    assert [key for key, _, _ in pairs] == sorted(oracle)
    for key, src, tgt in pairs:
        rel = tgt.relative_to(samples / "blip_diffusion" / "tgt_image").as_posix()
        assert src == samples / "blip_diffusion" / "src_image" / rel and key == dreambench_key(rel)


def test_dreambench_errors(root, tmp_path):
    samples = tmp_path / "samples"
    shutil.copytree(root / "dreambench" / "samples", samples)
    _, src, tgt = dreambench_files.dreambench_pairs(samples, "dreambooth_sd")[1]
    src.unlink()
    with pytest.raises(FileNotFoundError, match=f"{tgt}.*no reference image at {src}"):
        dreambench_files.dreambench_pairs(samples, "dreambooth_sd")
    with pytest.raises(FileNotFoundError, match=r"methods with one: \['blip_diffusion', 'dreambooth_sd'\]"):
        dreambench_files.dreambench_pairs(samples, "unknown_method")
    _, src, tgt = dreambench_files.dreambench_pairs(samples, "blip_diffusion")[0]
    shutil.copy(tgt, tgt.with_suffix(".jpg"))
    shutil.copy(src, src.with_suffix(".jpg"))
    with pytest.raises(ValueError, match="same key"):
        dreambench_files.dreambench_pairs(samples, "blip_diffusion")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dreambench_files.dreambench_methods(tmp_path / "nowhere")


def test_a_missing_view_column_is_named_beside_the_ones_found(positives):
    with pytest.raises(ValueError) as error:
        nearid_benchmark.view_columns(positives.remove_columns(["img2"]))
    message = str(error.value)
    assert "none of" not in message and "img2" in message and "img1, img3" in message
