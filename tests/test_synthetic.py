"""Tests of nearid_synthetic: Hub schemas, determinism, exact shared backgrounds, slot alignment, MTG
masks, DreamBench++ keys and ratings, split files, and the CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict, Value, load_from_disk
from datasets import Image as HFImage
from PIL import Image

from nearid.commands import synthetic as syn
from nearid.data.dreambench_files import dreambench_mh_from_files
from nearid.metrics import canonical_dreambench_key, dreambench_key
from nearid.synthetic import builders, drawing
from tests.helpers import user_error

SIZE = 48
SMALL = ["--num-identities", "10", "--image-size", str(SIZE), "--mtg-train", "4", "--mtg-test", "8",
         "--dreambench-subjects", "3", "--dreambench-prompts", "4"]
POSITIVE_COLUMNS = ["id", "category", "category_description", "img1", "img2", "img3", "n_images",
                    "objaverse_id", "prompts1", "prompts2", "prompts3", "quality"]
MTG_COLUMNS = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted",
               "image_1_object_mask", "image_2_object_mask", "image_1_part_mask", "image_2_part_mask"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build through the CLI entry point, with a few distractors dropped at random."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    manifest = syn.main(["--output-dir", str(out), "--seed", "3", "--missing-distractor-rate", "0.25", *SMALL])
    return out, manifest


@pytest.fixture(scope="module")
def positives(built):
    return load_from_disk(str(built[0] / "positives"))


def _array(image):
    return np.asarray(image, dtype=np.int16)


def _mask(image):
    return np.asarray(image) > 0


def test_cli_writes_every_output(built):
    out, manifest = built
    for name in ("positives", "flux", "sdxl", "mtg", "dreambench/samples", "dreambench/ratings",
                 "splits/train.json", "splits/val.json", "splits/test.json", "manifest.json", "README.md"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["sources"] == {"flux": "marking_color", "sdxl": "marking_shape"}
    assert on_disk["counts"]["positives"] == 10
    assert on_disk["counts"]["mtg_test"] == 8 and on_disk["counts"]["dreambench_images_per_method"] == 2 * 3 * 4


def test_cli_refuses_non_empty_output_unless_overwrite(built, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert "--overwrite" in user_error(capsys, syn.main, ["--output-dir", str(tmp_path), *SMALL])
    syn.main(["--output-dir", str(tmp_path), "--overwrite", *SMALL])
    assert not (tmp_path / "keep.txt").exists() and (tmp_path / "positives").is_dir()


def test_the_package_runs_as_the_command(tmp_path):
    """`python -m nearid.synthetic` (docs/evaluation.md) is the command `nearid.commands.synthetic`."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    done = subprocess.run([sys.executable, "-m", "nearid.synthetic", "--output-dir", str(tmp_path), "--image-size",
                           "8"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "python -m nearid.synthetic: error:" in done.stderr
    assert "must be at least 16" in done.stderr and not any(tmp_path.iterdir())


def test_every_flag_has_help_and_bad_values_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        syn.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(builders.SyntheticConfig)]
    assert all(flag in text for flag in flags)
    assert all(f.metadata.get("help") for f in dataclasses.fields(builders.SyntheticConfig))
    assert "unknown variation" in user_error(capsys, syn.main, ["--output-dir", str(tmp_path), "--sources", "flux=hat"],
                                             status=2)
    assert "categories" in user_error(capsys, syn.main, ["--output-dir", str(tmp_path), "--dreambench-categories",
                                                         "cars"], status=2)
    assert "at least 16" in user_error(capsys, syn.main, ["--output-dir", str(tmp_path), "--image-size", "8"],
                                       status=2)


def test_positives_schema(positives):
    assert positives.column_names == POSITIVE_COLUMNS
    f = positives.features
    assert all(isinstance(f[f"img{k}"], HFImage) for k in (1, 2, 3))
    assert {c: f[c].dtype for c in ("id", "category", "category_description", "objaverse_id", "prompts1",
                                    "n_images", "quality")} == {
        "id": "string", "category": "string", "category_description": "string", "objaverse_id": "string",
        "prompts1": "string", "n_images": "int64", "quality": "float64"}
    assert len(set(positives["id"])) == len(positives)
    for row in positives:
        assert row["category"] in drawing.SHAPES and row["category_description"] == drawing.SHAPES[row["category"]]
        assert len(row["objaverse_id"]) == 32 and 0 < row["quality"] <= 1
        for k in (1, 2, 3):
            present = k <= row["n_images"]
            assert (row[f"img{k}"] is not None) == present and (row[f"prompts{k}"] is not None) == present
            if present:
                assert row[f"img{k}"].mode == "RGB" and row[f"img{k}"].size == (SIZE, SIZE)
        assert not np.array_equal(_array(row["img1"]), _array(row["img2"]))  # new scene and pose
    assert set(positives["n_images"]) == {2, 3}


def test_image_column_names_option():
    cfg = builders.SyntheticConfig(output_dir="unused", num_identities=3, image_size=24, image_columns="images")
    positives, sources = builders.build_benchmark(cfg)
    assert positives.column_names == [c.replace("img", "images") for c in POSITIVE_COLUMNS]
    assert isinstance(positives.features["images1"], HFImage) and sorted(sources) == ["flux", "sdxl"]


def test_sources_are_aligned_by_row_with_equal_ids(built, positives):
    for name in ("flux", "sdxl"):
        source = load_from_disk(str(built[0] / name))
        assert source.column_names[:4] == ["id", "nimg1", "nimg2", "nimg3"]
        assert all(isinstance(source.features[f"nimg{k}"], HFImage) for k in (1, 2, 3))
        assert source.features["id"] == Value("string") and source["id"] == positives["id"]


def test_distractor_is_the_same_scene_outside_the_object_only(built, positives):
    checked = 0
    for name in ("flux", "sdxl"):
        source = load_from_disk(str(built[0] / name))
        for pos, neg in zip(positives, source):
            for k in (1, 2, 3):
                if neg[f"nimg{k}"] is None:
                    assert neg[f"inpaint_mask{k}"] is None
                    continue
                img, nimg, region = _array(pos[f"img{k}"]), _array(neg[f"nimg{k}"]), _mask(neg[f"inpaint_mask{k}"])
                assert 0.02 < region.mean() < 0.6  # an object, not the whole frame
                assert np.array_equal(img[~region], nimg[~region])
                assert np.abs(img[region] - nimg[region]).max() > 40
                checked += 1
    assert checked > 30


def test_missing_views_give_missing_distractors_in_the_same_slot(built, positives):
    dropped_slots = set()
    for name in ("flux", "sdxl"):
        source = load_from_disk(str(built[0] / name))
        for pos, neg in zip(positives, source):
            views = [pos[f"img{k}"] is not None for k in (1, 2, 3)]
            negs = [neg[f"nimg{k}"] is not None for k in (1, 2, 3)]
            assert all(v or not n for v, n in zip(views, negs))  # never a distractor without its view
            assert any(negs)
            dropped_slots |= {k for k in range(3) if views[k] and not negs[k]}
    assert dropped_slots == {0, 1, 2}  # extra drops hit every slot, not only the last one


def test_sources_use_different_variations(built, positives):
    flux, sdxl = (load_from_disk(str(built[0] / n)) for n in ("flux", "sdxl"))
    assert set(flux["variation"]) == {"marking_color"} and set(sdxl["variation"]) == {"marking_shape"}
    pairs = [(ra[f"nimg{k}"], rb[f"nimg{k}"]) for ra, rb in zip(flux, sdxl) for k in (1, 2, 3)
             if ra[f"nimg{k}"] is not None and rb[f"nimg{k}"] is not None]
    assert pairs and all(not np.array_equal(_array(a), _array(b)) for a, b in pairs)


def _files(root: Path) -> dict:
    skip = {"manifest.json", "README.md"}  # these name the output folder
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    args = ["--num-identities", "4", "--image-size", "24", "--mtg-train", "2", "--mtg-test", "2",
            "--dreambench-subjects", "1", "--dreambench-prompts", "2"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        syn.main(["--output-dir", str(tmp_path / name), "--seed", seed, *args])
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) > 30 and a == b
    for data in ("positives", "flux", "sdxl", "mtg/train", "mtg/test"):
        arrow = f"{data}/data-00000-of-00001.arrow"
        assert a[arrow] != c[arrow], data
    pngs = lambda files: {v for k, v in files.items() if k.endswith(".png")}  # noqa: E731
    assert pngs(a) and not pngs(a) & pngs(c)


def test_mtg_masks_and_oracle(built):
    mtg = load_from_disk(str(built[0] / "mtg"))
    assert isinstance(mtg, DatasetDict) and sorted(mtg) == ["test", "train"] and len(mtg["test"]) == 8
    oracles = []
    for split in ("train", "test"):
        assert mtg[split].column_names == MTG_COLUMNS
        for row in mtg[split]:
            assert not np.array_equal(_array(row["image_1_original"]), _array(row["image_2_original"]))
            for v in (1, 2):
                obj, part = row[f"image_{v}_object_mask"], row[f"image_{v}_part_mask"]
                assert obj.mode == part.mode == "L" and set(np.unique(np.asarray(obj))) <= {0, 255}
                obj, part = _mask(obj), _mask(part)
                assert part.any() and not (part & ~obj).any()
                oracles.append(1 - part.sum() / obj.sum())
                orig, inp = _array(row[f"image_{v}_original"]), _array(row[f"image_{v}_inpainted"])
                assert np.array_equal(orig[~part], inp[~part]) and np.abs(orig[part] - inp[part]).max() > 40
    oracles = np.array(oracles)
    assert ((oracles > 0) & (oracles < 1)).all() and oracles.std() > 0.1


def test_dreambench_keys_match_ratings_and_ratings_track_identity(built):
    root = built[0] / "dreambench"
    methods = built[1]["config"]["dreambench_methods"]
    assert len(methods) >= 2
    for method in methods:
        src, tgt = (root / "samples" / method / kind for kind in ("src_image", "tgt_image"))
        rel = sorted(p.relative_to(tgt).as_posix() for p in tgt.rglob("*.png"))
        assert rel == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png")) and len(rel) == 24
        keys = [dreambench_key(r) for r in rel]
        assert all(k.endswith("_0") and k.split("_")[0] in ("object", "live") for k in keys)
        stripped = {canonical_dreambench_key(k) for k in keys}
        assert stripped == {k[: -len("_0")] for k in keys}
        for group in ("group1", "group2"):
            path = root / "ratings/data_human_rating/merged_data" / group / f"{method}-cp.json"
            ratings = json.loads(path.read_text())
            assert set(ratings) == stripped
            assert all(isinstance(v, int) and 0 <= v <= 4 for v in ratings.values())
            assert len(set(ratings.values())) > 2
        assert Image.open(tgt / rel[0]).size == (SIZE, SIZE)
    mh = dreambench_mh_from_files(root / "ratings", "data_synthetic_oracle_rating", methods)
    assert mh["mh_object"] > 0.5 and mh["mh_live_subject_animal"] > 0.5


def test_split_files_are_disjoint_and_cover_all_rows(built, positives):
    splits = {n: json.loads((built[0] / "splits" / f"{n}.json").read_text()) for n in ("train", "val", "test")}
    assert all(splits.values()) and all(isinstance(i, int) for rows in splits.values() for i in rows)
    union = splits["train"] + splits["val"] + splits["test"]
    assert sorted(union) == list(range(len(positives)))  # disjoint (no duplicates) and complete
    assert builders.make_splits(10, 3, 0.15, 0.15) == splits
    with pytest.raises(ValueError, match="no training rows"):
        builders.make_splits(3, 0, 0.5, 0.5)
