"""evaluate.py `mtg` and `score` modes and `--model-index`, end to end on synthetic data.

Expected numbers are computed here independently of evaluate.py's code path: images decoded by
`datasets` / PIL, embedded one at a time with the model's own `get_image_features`, oracles counted
from the mask pixels with numpy, statistics with numpy.
"""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from nearid.commands import evaluate
import nearid.commands.synthetic
from nearid import metrics
from nearid.data import score_inputs
from tests.helpers import REPO_ROOT, serve_as_hub_datasets, user_error

MTG_TEST_ROWS = 8


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    nearid.commands.synthetic.main(["--output-dir", str(root), "--num-identities", "4", "--mtg-train", "2",
                                    "--mtg-test", str(MTG_TEST_ROWS), "--dreambench-subjects", "2",
                                    "--dreambench-prompts", "2", "--image-size", "32"])
    return root


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------
# mtg


def mtg_args(synthetic, tiny_repo, out, cache, *extra):
    return ["mtg", "--model", str(tiny_repo), "--mtg", str(synthetic / "mtg"), "--output-dir", str(out),
            "--cache-dir", str(cache), "--batch-size", "5", *extra]


def expected_mtg(dataset, embed):
    """Similarities, oracles and `mtg_scores` from images embedded one by one and mask pixel counts."""
    sims, oracles = {name: [] for name in ("s12", "s11p", "s22p", "s12p", "s21p")}, []
    for row in dataset:
        e = {f"{kind[0]}{v}": embed(row[f"image_{v}_{kind}"]) for v in (1, 2) for kind in ("original", "inpainted")}
        for name, (a, b) in {"s12": ("o1", "o2"), "s11p": ("o1", "i1"), "s22p": ("o2", "i2"),
                             "s12p": ("o1", "i2"), "s21p": ("o2", "i1")}.items():
            sims[name].append(float(e[a] @ e[b]))
        oracles.append([1 - (np.asarray(row[f"image_{v}_part_mask"].convert("L")) > 0).sum()
                        / (np.asarray(row[f"image_{v}_object_mask"].convert("L")) > 0).sum() for v in (1, 2)])
    oracles = np.array(oracles)
    scores = metrics.mtg_scores(sims["s12"], sims["s11p"], sims["s22p"], sims["s12p"], sims["s21p"],
                                oracles[:, 0], oracles[:, 1])
    return sims, oracles, scores


def assert_same_scores(actual, expected):
    for key in ("mo", "mo_pair", "r_s11p_oracle1", "r_s22p_oracle2", "r_s12p_oracle2", "r_s21p_oracle1"):
        assert actual[key] == pytest.approx(expected[key], abs=1e-5), key
    assert (actual["ssr"], actual["pa"], actual["n_rows"]) == (expected["ssr"], expected["pa"], expected["n_rows"])


def test_mtg_end_to_end_matches_independent_computation_and_rerun_is_free(synthetic, tiny_repo, embed, tmp_path):
    from datasets import load_from_disk

    first = evaluate.main(mtg_args(synthetic, tiny_repo, tmp_path / "a", tmp_path / "cache"))
    assert first["embedding"]["forward_passes"] > 0
    assert first["embedding"]["images_embedded"] == first["embedding"]["unique_images"]

    sims, oracles, expected = expected_mtg(load_from_disk(str(synthetic / "mtg"))["test"], embed)
    assert expected["n_rows"] == MTG_TEST_ROWS
    assert_same_scores(first, expected)

    second = evaluate.main(mtg_args(synthetic, tiny_repo, tmp_path / "b", tmp_path / "cache"))
    assert second["embedding"]["forward_passes"] == 0 and second["embedding"]["images_embedded"] == 0
    assert {k: v for k, v in second.items() if k != "embedding"} == {k: v for k, v in first.items() if k != "embedding"}

    out = tmp_path / "b"
    assert {p.name for p in out.iterdir()} == {"mtg_results.json", "mtg_table.md", "mtg_per_sample.csv",
                                              "mtg_similarity_vs_oracle.png", "mtg_args.json"}
    document = json.loads((out / "mtg_results.json").read_text())
    assert_same_scores(document["metrics"], expected)
    assert document["benchmark"] == "mtg" and document["skipped"] == []
    assert document["provenance"]["datasets"][0]["split"] == "test"
    assert document["provenance"]["extra"]["embedding"]["forward_passes"] == 0
    rows = read_csv(out / "mtg_per_sample.csv")
    assert len(rows) == MTG_TEST_ROWS
    for name, values in sims.items():
        assert [float(r[name]) for r in rows] == pytest.approx(values, abs=1e-5)
    assert [float(r["oracle1"]) for r in rows] == pytest.approx(oracles[:, 0].tolist())
    assert sum(r["both_win"] == "True" for r in rows) == round(expected["ssr"] * MTG_TEST_ROWS / 100)
    table = (out / "mtg_table.md").read_text()
    assert f"| {expected['mo']:.3f} | {expected['mo_pair']:.3f} |" in table
    with Image.open(out / "mtg_similarity_vs_oracle.png") as plot:
        assert plot.format == "PNG" and plot.width > 400


def corrupted_mtg(synthetic, folder):
    """The MTG test split with row 0's image_1_inpainted undecodable and row 1's object mask 2 empty."""
    from datasets import Image as HFImage
    from datasets import load_from_disk

    test = load_from_disk(str(synthetic / "mtg"))["test"]
    test = test.cast_column("image_1_inpainted", HFImage(decode=False))
    test = test.cast_column("image_2_object_mask", HFImage(decode=False))
    black = Image.new("L", (32, 32))

    def damage(row, index):
        if index == 0:
            row["image_1_inpainted"] = {"bytes": b"not an image", "path": None}
        if index == 1:
            row["image_2_object_mask"] = {"bytes": png_bytes(black), "path": None}
        return row

    test.map(damage, with_indices=True).save_to_disk(str(folder))
    return folder


def png_bytes(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_mtg_bad_rows_stop_the_run_or_are_skipped_and_listed(synthetic, tiny_repo, embed, tmp_path, capsys):
    from datasets import load_from_disk

    broken = corrupted_mtg(synthetic, tmp_path / "broken")
    args = mtg_args(synthetic, tiny_repo, tmp_path / "out", tmp_path / "cache")
    args[args.index("--mtg") + 1] = str(broken)
    assert "MTG row 1 view 2: object mask is empty" in user_error(capsys, evaluate.main, args)
    assert not (tmp_path / "out").exists()

    result = evaluate.main(args + ["--skip-bad-images"])
    _, _, expected = expected_mtg(load_from_disk(str(synthetic / "mtg"))["test"].select(range(2, MTG_TEST_ROWS)), embed)
    assert_same_scores(result, expected)
    assert (result["n_rows_dataset"], result["n_rows_unscored"]) == (MTG_TEST_ROWS, 2)
    document = json.loads((tmp_path / "out" / "mtg_results.json").read_text())
    places = sorted(s["image"] for s in document["skipped"])
    assert places == ["MTG row 0 column image_1_inpainted", "MTG row 1 view 2"]
    assert [r["scored"] for r in read_csv(tmp_path / "out" / "mtg_per_sample.csv")][:3] == ["False", "False", "True"]


# --------------------------------------------------------------------------------------------------
# --model-index


def split_card(text):
    match = re.match(r"---\n(.*?\n)---\n", text, re.S)
    return yaml.safe_load(match.group(1)), text[match.end():]


def card_values(meta):
    """{(dataset type, split, metric type): value} of a front matter's model-index."""
    return {(r["dataset"]["type"], r["dataset"].get("split"), m["type"]): m["value"]
            for entry in meta.get("model-index", []) for r in entry["results"] for m in r["metrics"]}


def test_model_index_records_mtg_and_nearid_results_and_keeps_the_card(synthetic, tiny_repo, tmp_path, monkeypatch):
    card = tmp_path / "README.md"
    shutil.copyfile(REPO_ROOT / "README.md", card)
    original_meta, original_body = split_card(card.read_text())
    before = card_values(original_meta)
    # Results are filed under a Hub dataset only when read from it at a recorded commit.
    hub = serve_as_hub_datasets(monkeypatch, {"abdo-eldesokey/mtg-dataset": synthetic / "mtg",
                                              "someone/nearid-mini": synthetic / "positives",
                                              "someone/nearid-mini-Flux": synthetic / "flux"})

    args = mtg_args(synthetic, tiny_repo, tmp_path / "mtg", tmp_path / "cache", "--model-index", str(card),
                    "--model-index-name", "tiny-nearid")
    args[args.index(str(synthetic / "mtg"))] = hub["abdo-eldesokey/mtg-dataset"]
    mtg = evaluate.main(args)
    nearid = evaluate.main(["nearid", "--model", str(tiny_repo), "--positives", hub["someone/nearid-mini"],
                            "--source", f"flux={hub['someone/nearid-mini-Flux']}",
                            "--output-dir", str(tmp_path / "nearid"),
                            "--cache-dir", str(tmp_path / "cache"), "--model-index", str(card)])

    meta, body = split_card(card.read_text())
    assert body == original_body
    assert {k: v for k, v in meta.items() if k != "model-index"} == \
        {k: v for k, v in original_meta.items() if k != "model-index"}
    assert [entry["name"] for entry in meta["model-index"]] == ["tiny-nearid"]  # kept by the second run
    mtg_id, nearid_id = "abdo-eldesokey/mtg-dataset", "someone/nearid-mini"
    expected = {**before,
                **{(mtg_id, "test", key): round(mtg[key], 4) for key in ("mo", "mo_pair", "ssr", "pa")},
                **{(nearid_id, "train", key): round(nearid["pooled_given"][key], 4) for key in ("ssr", "pa")}}
    assert card_values(meta) == pytest.approx(expected)


def test_model_index_card_must_exist(synthetic, tiny_repo, tmp_path, capsys):
    message = user_error(capsys, evaluate.main, mtg_args(synthetic, tiny_repo, tmp_path / "out", tmp_path / "cache",
                                                         "--model-index", str(tmp_path / "missing.md")))
    assert "no such file" in message
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# score


def expected_summary(records_by_image):
    """{subject: (n, mean, median, std of score_mean, mean of score_max)} with numpy."""
    out = {}
    for subject in {r["subject"] for r in records_by_image}:
        means = np.array([r["score_mean"] for r in records_by_image if r["subject"] == subject])
        maxes = np.array([r["score_max"] for r in records_by_image if r["subject"] == subject])
        out[subject] = (len(means), means.mean(), np.median(means), means.std(), maxes.mean())
    return out


def assert_summary(group, n, mean, median, std, max_mean):
    assert group["n_images"] == n
    assert (group["score_mean"]["mean"], group["score_mean"]["median"], group["score_mean"]["std"]) == \
        pytest.approx((mean, median, std), abs=1e-5)
    assert group["score_max"]["mean"] == pytest.approx(max_mean, abs=1e-5)


def test_score_mirrored_layout_several_methods_and_one(synthetic, tiny_repo, embed, tmp_path):
    samples = synthetic / "dreambench" / "samples"
    result = evaluate.main(["score", "--model", str(tiny_repo), "--samples", str(samples),
                            "--output-dir", str(tmp_path / "all"), "--cache-dir", str(tmp_path / "cache")])
    methods = sorted(p.name for p in samples.iterdir())
    assert sorted(result["summary"]) == methods

    for method in methods:
        expected = []
        for generated in sorted((samples / method / "tgt_image").rglob("*.png")):
            rel = generated.relative_to(samples / method / "tgt_image")
            score = float(embed(Image.open(generated)) @ embed(Image.open(samples / method / "src_image" / rel)))
            expected.append({"subject": rel.parts[0], "generated": f"{method}/tgt_image/{rel.as_posix()}",
                             "score_mean": score, "score_max": score})
        got = {r["generated"]: r for r in result["records"] if r["method"] == method}
        assert sorted(got) == sorted(e["generated"] for e in expected)
        for e in expected:
            record = got[e["generated"]]
            assert record["subject"] == e["subject"] and record["n_references"] == 1
            assert record["score_mean"] == record["score_max"] == pytest.approx(e["score_mean"], abs=1e-5)
        for subject, numbers in expected_summary(expected).items():
            assert_summary(result["summary"][method]["subjects"][subject], *numbers)
        all_scores = np.array([e["score_mean"] for e in expected])
        assert_summary(result["summary"][method]["overall"], len(all_scores), all_scores.mean(),
                       np.median(all_scores), all_scores.std(), all_scores.mean())

    one = evaluate.main(["score", "--model", str(tiny_repo), "--samples", str(samples / methods[0]),
                         "--output-dir", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache")])
    assert one["embedding"]["forward_passes"] == 0  # every image was embedded by the first run
    assert one["summary"] == {methods[0]: result["summary"][methods[0]]}
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"score_per_image.csv", "score_per_image.json",
                                                             "score_summary.md", "score_results.json",
                                                             "score_distributions.png", "score_args.json"}


@pytest.fixture(scope="module")
def user_images(synthetic, tmp_path_factory):
    """A user's folder: 3 generated images and 3 references, copied from the synthetic samples."""
    samples = synthetic / "dreambench" / "samples" / "blip_diffusion"
    folder = tmp_path_factory.mktemp("user")
    (folder / "gen").mkdir()
    (folder / "refs").mkdir()
    for i, path in enumerate(sorted((samples / "tgt_image").rglob("*.png"))[:3]):
        shutil.copyfile(path, folder / "gen" / f"g{i}.png")
    subjects = sorted(p for p in (samples / "src_image").iterdir())[:3]
    for i, subject in enumerate(subjects):
        shutil.copyfile(next(subject.glob("*.png")), folder / "refs" / f"r{i}.png")
    return folder


# generated -> (references, subject or None)
USER_MAPPING = {"gen/g0.png": (["refs/r0.png", "refs/r1.png"], "cat"),
                "gen/g1.png": (["refs/r0.png"], "cat"),
                "gen/g2.png": (["refs/r2.png", "refs/r1.png"], None)}


def write_metadata(folder, kind):
    if kind == "csv":
        lines = ["generated,reference,subject"]
        lines += [f"{g},{r},{s or ''}" for g, (refs, s) in USER_MAPPING.items() for r in refs]
        path = folder / "meta.csv"
        path.write_text("\n".join(lines) + "\n")
        return path
    entries = [{"generated": g, "reference": refs, **({"subject": s} if s else {})}
               for g, (refs, s) in USER_MAPPING.items()]
    path = folder / f"meta.{kind}"
    text = json.dumps(entries) if kind == "json" else "\n".join(json.dumps(e) for e in entries) + "\n"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", ["csv", "json", "jsonl"])
def test_score_metadata_aggregates_several_references(user_images, tiny_repo, embed, tmp_path, kind):
    metadata = write_metadata(tmp_path, kind)  # outside the image folder: paths resolve against --images
    result = evaluate.main(["score", "--model", str(tiny_repo), "--metadata", str(metadata),
                            "--images", str(user_images), "--output-dir", str(tmp_path / "out"),
                            "--cache-dir", str(tmp_path / "cache")])

    emb = {p: embed(Image.open(user_images / p)) for p in [*USER_MAPPING, "refs/r0.png", "refs/r1.png", "refs/r2.png"]}
    expected = []
    for generated, (refs, subject) in USER_MAPPING.items():
        sims = [float(emb[generated] @ emb[r]) for r in refs]
        expected.append({"generated": generated, "subject": subject or sorted(refs)[0],
                         "score_mean": float(np.mean(sims)), "score_max": max(sims), "n": len(refs)})
    records = {r["generated"]: r for r in result["records"]}
    for e in expected:
        record = records[e["generated"]]
        assert (record["subject"], record["n_references"]) == (e["subject"], e["n"])
        assert (record["score_mean"], record["score_max"]) == pytest.approx((e["score_mean"], e["score_max"]), abs=1e-5)
    assert e["score_mean"] < e["score_max"]  # two different references: the mean and max differ
    summary = result["summary"][user_images.name]  # method: the images folder's name
    for subject, numbers in expected_summary(expected).items():
        assert_summary(summary["subjects"][subject], *numbers)
    assert summary["overall"]["n_images"] == 3 and summary["overall"]["n_references"] == 3

    rows = read_csv(tmp_path / "out" / "score_per_image.csv")
    assert [float(r["score_max"]) for r in rows] == pytest.approx([e["score_max"] for e in expected], abs=1e-5)
    per_image = json.loads((tmp_path / "out" / "score_per_image.json").read_text())
    assert per_image[0]["references"] == pytest.approx({r: float(emb["gen/g0.png"] @ emb[r])
                                                        for r in USER_MAPPING["gen/g0.png"][0]}, abs=1e-5)
    document = json.loads((tmp_path / "out" / "score_results.json").read_text())
    assert document["metrics"] == json.loads(json.dumps(result["summary"]))
    assert document["counts"][f"{user_images.name}/overall/n_images"] == 3


def test_score_unreadable_images_stop_the_run_or_are_skipped_and_listed(user_images, tiny_repo, embed, tmp_path,
                                                                         capsys):
    images = tmp_path / "images"
    shutil.copytree(user_images, images)
    (images / "refs" / "broken.png").write_bytes(b"not an image")
    metadata = images / "meta.csv"
    metadata.write_text("generated,reference\ngen/g0.png,refs/r0.png\ngen/g0.png,refs/broken.png\n"
                        "gen/g1.png,refs/broken.png\n")
    args = ["score", "--model", str(tiny_repo), "--metadata", str(metadata), "--output-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    message = user_error(capsys, evaluate.main, args)
    assert "refs/broken.png" in message and "--skip-bad-images" in message
    assert not (tmp_path / "out").exists()

    result = evaluate.main(args + ["--skip-bad-images"])
    [record] = result["records"]
    assert (record["generated"], record["n_references"]) == ("gen/g0.png", 1)
    expected = float(embed(Image.open(images / "gen" / "g0.png")) @ embed(Image.open(images / "refs" / "r0.png")))
    assert record["score_mean"] == pytest.approx(expected, abs=1e-5)
    document = json.loads((tmp_path / "out" / "score_results.json").read_text())
    reasons = {s["image"]: s["reason"] for s in document["skipped"]}
    assert reasons["gen/g1.png"] == "not scored: no readable reference"
    assert any("broken.png" in image for image in reasons) and len(reasons) == 2


BAD_METADATA = [
    ("meta.csv", "generated,reference\ngen/g0.png,refs/r0.png\ngen/g1.png,refs/missing.png\n",
     FileNotFoundError, r"meta\.csv line 3: reference image 'refs/missing\.png' not found"),
    ("meta.jsonl", '{"generated": "gen/g0.png", "reference": "refs/r0.png"}\n{"generated": "gen/nope.png", '
     '"reference": "refs/r0.png"}\n', FileNotFoundError, r"meta\.jsonl line 2: generated image 'gen/nope\.png'"),
    ("meta.csv", "generated,reference,prompt\ngen/g0.png,refs/r0.png,a cat\n",
     ValueError, r"meta\.csv line 1 \(header\): unknown column\(s\) \['prompt'\]"),
    ("meta.json", '[{"generated": "gen/g0.png", "references": ["refs/r0.png"]}]',
     ValueError, r"meta\.json entry 1: unknown column\(s\) \['references'\]"),
    ("meta.csv", "generated,subject\ngen/g0.png,cat\n", ValueError, r"missing or empty column\(s\) \['reference'\]"),
    ("meta.csv", "generated,reference\n", ValueError, "lists no images"),
    ("meta.csv", "", ValueError, "lists no images"),
    ("meta.json", "[]", ValueError, "lists no images"),
    ("meta.jsonl", "\n", ValueError, "lists no images"),
    ("meta.json", '{"generated": "gen/g0.png"}', ValueError, "expected a list of objects"),
    ("meta.jsonl", '{"generated": "gen/g0.png",\n', ValueError, r"meta\.jsonl line 1 is not valid JSON"),
    ("meta.csv", "generated,reference\ngen/g0.png,refs/r0.png\ngen/g0.png,refs/r0.png\n",
     ValueError, r"line 3: reference 'refs/r0\.png' of generated image 'gen/g0\.png' is listed twice"),
    ("meta.csv", "generated,reference,subject\ngen/g0.png,refs/r0.png,cat\ngen/g0.png,refs/r1.png,dog\n",
     ValueError, r"line 3: subject 'dog' of generated image 'gen/g0\.png' disagrees with 'cat'"),
    ("meta.txt", "gen/g0.png refs/r0.png\n", ValueError, "unknown format '.txt'"),
]


@pytest.mark.parametrize("name, text, error, message", BAD_METADATA)
def test_bad_metadata_is_reported_with_its_line(user_images, tmp_path, name, text, error, message):
    metadata = user_images / name
    metadata.write_text(text)
    try:
        with pytest.raises(error, match=message):
            score_inputs.read_score_metadata(metadata)
    finally:
        metadata.unlink()


def test_bad_metadata_stops_score_before_any_output(user_images, tiny_repo, tmp_path, capsys):
    metadata = tmp_path / "meta.csv"
    metadata.write_text("generated,reference\ngen/g0.png,refs/r9.png\n")
    message = user_error(capsys, evaluate.main, ["score", "--model", str(tiny_repo), "--metadata", str(metadata),
                                                 "--images", str(user_images), "--output-dir", str(tmp_path / "out")])
    assert re.search(r"meta\.csv line 2: reference image 'refs/r9\.png'", message)
    assert not (tmp_path / "out").exists()


def test_score_argument_combinations_are_refused(tmp_path, capsys):
    assert "--images goes with --metadata" in user_error(
        capsys, evaluate.main, ["score", "--model", "m", "--samples", str(tmp_path), "--images", str(tmp_path)])
    assert "--methods picks method folders" in user_error(
        capsys, evaluate.main, ["score", "--model", "m", "--metadata", "x.csv", "--methods", "a"])
    assert "exactly one input" in user_error(capsys, evaluate.main, ["score", "--model", "m"])
