"""evaluate.py never silently wrong: every image format Pillow reads, no stale files from an earlier run,
a damaged embedding store recomputed rather than trusted, a missing file skipped when asked."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from nearid.commands import evaluate
from tests.helpers import user_error


def run_score(model, samples, out, cache, *extra):
    return evaluate.main(["score", "--model", str(model), "--samples", str(samples), "--output-dir", str(out),
                          "--cache-dir", str(cache), "--device", "cpu", *extra])


@pytest.fixture
def samples(synthetic, tmp_path):
    """One method's mirrored samples, plus a .gif and a .tiff pair and a non-image file."""
    folder = tmp_path / "method"
    shutil.copytree(synthetic / "dreambench" / "samples" / "blip_diffusion", folder)
    subject = sorted((folder / "tgt_image").iterdir())[0].name
    for fmt, suffix in (("GIF", ".gif"), ("TIFF", ".tiff")):
        for side, color in (("src_image", (200, 30, 30)), ("tgt_image", (190, 40, 35))):
            Image.new("RGB", (32, 32), color).save(folder / side / subject / f"extra_{fmt}{suffix}", format=fmt)
    (folder / "tgt_image" / subject / "notes.txt").write_text("prompt notes")
    return folder, subject


def test_score_takes_every_format_pillow_reads_and_lists_what_it_left_out(tiny_repo, samples, tmp_path):
    folder, subject = samples
    result = run_score(tiny_repo, folder, tmp_path / "out", tmp_path / "cache")
    generated = {r["generated"] for r in result["records"]}
    assert {f"tgt_image/{subject}/extra_GIF.gif", f"tgt_image/{subject}/extra_TIFF.tiff"} <= generated
    images = len([p for p in (folder / "tgt_image").rglob("*") if p.is_file() and p.suffix != ".txt"])
    assert len(result["records"]) == images
    document = json.loads((tmp_path / "out" / "score_results.json").read_text())
    [left_out] = document["skipped"]
    assert left_out["image"].endswith("notes.txt") and "not an image format" in left_out["reason"]
    assert "1 images or files were left out" in (tmp_path / "out" / "score_summary.md").read_text()


def test_a_rerun_leaves_no_file_of_the_earlier_run(synthetic, tiny_repo, tmp_path):
    common = ["dreambench", "--ratings", str(synthetic / "dreambench" / "ratings"), "--samples",
              str(synthetic / "dreambench" / "samples"), "--model", str(tiny_repo), "--output-dir", str(tmp_path / "out"),
              "--cache-dir", str(tmp_path / "cache")]
    evaluate.main(common)
    assert {p.name for p in (tmp_path / "out" / "dreambench_scores").iterdir()} == {"blip_diffusion.json",
                                                                                 "dreambooth_sd.json"}
    evaluate.main(common + ["--methods", "dreambooth_sd"])
    assert [p.name for p in (tmp_path / "out" / "dreambench_scores").iterdir()] == ["dreambooth_sd.json"]
    document = json.loads((tmp_path / "out" / "dreambench_results.json").read_text())
    assert "dreambench_scores/dreambooth_sd.json" in document["files"]
    assert not any("blip" in name for name in document["files"])


def store_shards(cache):
    [folder] = [p for p in cache.iterdir() if p.is_dir()]
    return sorted(folder.glob("shard-*.npy"))


@pytest.mark.parametrize("damage", ["nan", "truncate"])
def test_a_damaged_embedding_store_is_recomputed_not_trusted(tiny_repo, samples, tmp_path, damage, caplog):
    folder, _ = samples
    first = run_score(tiny_repo, folder, tmp_path / "a", tmp_path / "cache")
    [shard] = store_shards(tmp_path / "cache")
    if damage == "nan":
        records = np.load(shard)
        records["values"][:] = np.nan
        np.save(shard, records)
    else:
        shard.write_bytes(shard.read_bytes()[:500])
    with caplog.at_level("WARNING", logger="nearid.store"):
        second = run_score(tiny_repo, folder, tmp_path / "b", tmp_path / "cache")
    assert shard.name in caplog.text and "computed again" in caplog.text
    assert second["embedding"]["images_embedded"] == first["embedding"]["images_embedded"]
    assert second["summary"] == first["summary"]  # finite, and the same numbers as before the damage


def test_skip_bad_images_covers_a_missing_file_in_a_path_based_dataset(synthetic, tiny_repo, tmp_path, capsys):
    """Parquet datasets whose images are file paths (no bytes), one of the files deleted."""
    files = tmp_path / "files"
    files.mkdir()

    def by_path(name):
        dataset = datasets.load_from_disk(str(synthetic / name))
        columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
        table = {"id": list(dataset["id"])}
        for column in columns:
            table[column] = []
            for index, image in enumerate(dataset[column]):
                path = files / f"{name}_{index}_{column}.png" if image is not None else None
                if path:
                    image.save(path)
                table[column].append(None if path is None else str(path))
        features = datasets.Features({"id": datasets.Value("string"), **{c: datasets.Image() for c in columns}})
        # Parquet keeps the paths (save_to_disk would embed the bytes).
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / f"{name}.parquet"))
        return tmp_path / f"{name}.parquet"

    positives, flux = by_path("positives"), by_path("flux")
    missing = files / "flux_1_nimg1.png"
    if not missing.exists():
        missing = sorted(files.glob("flux_*"))[0]
    missing.unlink()
    args = ["nearid", "--model", str(tiny_repo), "--positives", str(positives), "--source", f"flux={flux}",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    message = user_error(capsys, evaluate.main, args)
    assert missing.name in message and "--skip-bad-images" in message
    result = evaluate.main(args + ["--skip-bad-images"])
    document = json.loads((tmp_path / "out" / "nearid_results.json").read_text())
    [skipped] = document["skipped"]
    assert "no such image file" in skipped["reason"] and missing.name in skipped["reason"]
    assert result["per_source"]["flux"]["n_samples"] == len(datasets.load_from_disk(str(synthetic / "positives")))


def test_the_mirrored_layout_walks_each_generated_folder_once_and_lists_what_it_left_out(synthetic, tmp_path,
                                                                                         monkeypatch):
    from nearid import images
    from nearid.data import score_inputs

    samples = tmp_path / "samples"
    shutil.copytree(synthetic / "dreambench" / "samples", samples)
    samples = samples.resolve()
    methods = sorted(p.name for p in samples.iterdir())
    for method in methods:
        (samples / method / "tgt_image" / "notes.txt").write_text("prompt notes")
    walks, find_images = [], images.find_images

    def counting_find_images(folder, recursive=True):
        walks.append(Path(folder))
        return find_images(folder, recursive)

    monkeypatch.setattr(images, "find_images", counting_find_images)  # dreambench_files looks it up in nearid.images
    monkeypatch.setattr(score_inputs, "find_images", counting_find_images)
    items, left_out = score_inputs.score_items_from_layout(samples)

    assert sorted(walks) == [samples / method / "tgt_image" for method in methods]
    assert [path for path, _ in left_out] == [samples / method / "tgt_image" / "notes.txt" for method in methods]
    generated = [p for method in methods for p in (samples / method / "tgt_image").rglob("*.png")]
    assert len(generated) > len(methods) and sorted(item.generated for item in items) == sorted(
        p.relative_to(samples).as_posix() for p in generated)
