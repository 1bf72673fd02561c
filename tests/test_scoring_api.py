"""Scoring your own generations: the DreamBooth folder layout (`evaluate.py score --references --generations`)
and the Python API (`nearid.IdentityScorer`), which give the same numbers for the same files."""

import json

import numpy as np
import pytest
from PIL import Image

from nearid.commands import evaluate
from nearid import IdentityScorer
from tests.helpers import user_error

SUBJECTS = ("cat_toy", "red_cup")
METHODS = ("dreambooth", "ip_adapter")


def picture(seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (4, 4, 20, 18))
    return image


@pytest.fixture
def layout(tmp_path):
    """references/<subject>/ (2 each) and generations/<method>/<subject>/ (3 per subject and method)."""
    for s, subject in enumerate(SUBJECTS):
        (tmp_path / "references" / subject).mkdir(parents=True)
        for r in range(2):
            picture(100 * s + r).save(tmp_path / "references" / subject / f"ref{r}.jpg", quality=95)
        for m, method in enumerate(METHODS):
            folder = tmp_path / "generations" / method / subject
            folder.mkdir(parents=True)
            for g in range(3):
                picture(1000 + 100 * m + 10 * s + g).save(folder / f"gen{g}.png")
    return tmp_path / "references", tmp_path / "generations"


def score_args(tiny_repo, tmp_path, *extra):
    return ["score", "--model", str(tiny_repo), "--output-dir", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), *extra]


def test_every_generation_is_scored_against_all_references_of_its_subject(tiny_repo, layout, embed, tmp_path):
    references, generations = layout
    result = evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                      str(generations)))
    assert sorted(result["summary"]) == sorted(METHODS) and len(result["records"]) == 12
    for record in result["records"]:
        generated = tmp_path / record["generated"]
        refs = sorted((references / record["subject"]).iterdir())
        sims = [float(embed(generated) @ embed(ref)) for ref in refs]
        assert record["n_references"] == 2 and generated.parent.name == record["subject"]
        assert record["score_mean"] == pytest.approx(np.mean(sims), abs=1e-5)
        assert record["score_max"] == pytest.approx(max(sims), abs=1e-5)
    summary = (tmp_path / "out" / "score_summary.md").read_text()
    assert "Methods side by side" in summary and "| subject | dreambooth | ip_adapter |" in summary
    assert (tmp_path / "out" / "score_distributions.png").is_file()


def test_the_python_api_gives_the_commands_numbers(tiny_repo, layout, tmp_path):
    references, generations = layout
    command = evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                       str(generations)))
    scorer = IdentityScorer(str(tiny_repo), device="cpu")
    table = scorer.score_folders(references, generations)
    assert table.records == command["records"] and table.summary == command["summary"]
    assert "| subject | dreambooth | ip_adapter |" in table.markdown()

    record = command["records"][0]
    refs = sorted((references / record["subject"]).iterdir())
    generated = tmp_path / record["generated"]
    assert scorer.score(refs, generated) == pytest.approx(record["score_mean"], abs=1e-6)
    assert scorer.score(refs, generated, reduce="max") == pytest.approx(record["score_max"], abs=1e-6)
    matrix = scorer.score(refs, [generated, generated], reduce=None)
    assert matrix.shape == (2, 2) and np.allclose(matrix[0], matrix[1])


def test_the_api_embeds_paths_pil_images_bytes_and_folders_alike(tiny_repo, layout):
    references, _ = layout
    path = references / SUBJECTS[0] / "ref0.jpg"
    scorer = IdentityScorer(str(tiny_repo), device="cpu")
    vectors = scorer.embed([path, Image.open(path), path.read_bytes()])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], vectors[2])  # the same encoded bytes: the same key
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)  # decoded by PIL: the same pixels
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    folder = scorer.embed(references / SUBJECTS[0])
    assert folder.shape == (2, 32) and np.array_equal(folder[0], vectors[0])


def test_the_api_keeps_embeddings_in_a_store_shared_with_the_commands(tiny_repo, layout, tmp_path):
    references, generations = layout
    evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations", str(generations)))
    scorer = IdentityScorer(str(tiny_repo), device="cpu", cache_dir=tmp_path / "cache")
    table = scorer.score_folders(references, generations)
    [store] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    index = json.loads((store / "index.json").read_text())
    assert index["last_fill"]["images_computed"] == 0 and len(table.records) == 12  # all read back


def test_subjects_without_references_are_an_error_and_unused_references_are_listed(tiny_repo, layout, tmp_path,
                                                                                   capsys):
    references, generations = layout
    (generations / METHODS[0] / "blue_vase").mkdir()
    picture(7).save(generations / METHODS[0] / "blue_vase" / "gen0.png")
    message = user_error(capsys, evaluate.main, score_args(tiny_repo, tmp_path, "--references", str(references),
                                                           "--generations", str(generations)))
    assert "generations without references: dreambooth/blue_vase" in message

    (generations / METHODS[0] / "blue_vase" / "gen0.png").unlink()
    (generations / METHODS[0] / "blue_vase").rmdir()
    for path in (generations / METHODS[1] / SUBJECTS[1]).iterdir():
        path.unlink()
    result = evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                      str(generations)))
    assert result["skipped"] == []  # a reference folder is not an image or file left out
    assert result["unused_references"] == [{"references": str(references / SUBJECTS[1]), "method": METHODS[1]}]
    summary = (tmp_path / "out" / "score_summary.md").read_text()
    assert f"no generations (not scored): {METHODS[1]}: {SUBJECTS[1]}." in summary


def test_skipped_images_are_counted_in_the_summary(tiny_repo, layout, tmp_path):
    references, generations = layout
    (generations / METHODS[0] / SUBJECTS[0] / "gen1.png").write_bytes(b"not an image")
    result = evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                      str(generations), "--skip-bad-images"))
    group = result["summary"][METHODS[0]]["subjects"][SUBJECTS[0]]
    assert (group["n_images"], group["n_skipped"]) == (2, 1)
    summary = (tmp_path / "out" / "score_summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith(f"| {SUBJECTS[0]} | 2 | 1 |"))
    assert len(row.split("|")) == 14  # subject, images, skipped, references, mean..max, max-ref mean/min/max
    assert "(1 skipped)" in summary  # the side-by-side table says so too


def test_score_inputs_are_checked(tiny_repo, layout, capsys, tmp_path):
    references, generations = layout
    assert "go together" in user_error(capsys, evaluate.main, score_args(tiny_repo, tmp_path, "--references",
                                                                         str(references)))
    assert "--methods ['nope'] not found" in user_error(
        capsys, evaluate.main, score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                          str(generations), "--methods", "nope"))


def test_a_local_folder_with_a_revision_loads_as_in_transformers(tiny_repo, layout):
    # The quick start pins revision="main"; with a downloaded folder in place of the Hub id,
    # transformers' from_pretrained ignores the revision, and so does the scorer (no CLI flag named).
    references, _ = layout
    pinned = IdentityScorer(str(tiny_repo), revision="main", device="cpu")
    plain = IdentityScorer(str(tiny_repo), device="cpu")
    np.testing.assert_array_equal(pinned.embed(str(references)), plain.embed(str(references)))


def test_generation_folders_that_match_no_reference_subject_name_both_sets(tiny_repo, tmp_path, capsys):
    (tmp_path / "references" / "chelsea").mkdir(parents=True)
    picture(1).save(tmp_path / "references" / "chelsea" / "ref.png")
    (tmp_path / "generations" / "Chelsea").mkdir(parents=True)  # one method's images, subject named in another case
    picture(2).save(tmp_path / "generations" / "Chelsea" / "gen.png")
    args = score_args(tiny_repo, tmp_path, "--references", str(tmp_path / "references"), "--generations",
                      str(tmp_path / "generations"))
    message = user_error(capsys, evaluate.main, args)
    assert "Reference subjects (--references): chelsea" in message
    assert "Folders under --generations: Chelsea/ (1 image directly in it)" in message
    assert "'Chelsea' vs the reference subject 'chelsea'" in message and "case" in message

    (tmp_path / "generations" / "Chelsea").rename(tmp_path / "generations" / "dreambooth")  # images in a method folder
    message = user_error(capsys, evaluate.main, args)
    assert "Images lie directly in dreambooth/" in message and "Reference subjects (--references): chelsea" in message
    assert "case" not in message

    (tmp_path / "generations" / "dreambooth" / "Chelsea").mkdir()  # method/<subject> with the subject's case changed
    method = tmp_path / "generations" / "dreambooth"
    (method / "gen.png").rename(method / "Chelsea" / "gen.png")
    message = user_error(capsys, evaluate.main, args)
    assert "generations without references: dreambooth/Chelsea" in message
    assert "'Chelsea' vs the reference subject 'chelsea'" in message


def test_left_out_files_are_counted_once_with_short_reasons(tiny_repo, layout, tmp_path):
    references, generations = layout
    broken = generations / METHODS[0] / SUBJECTS[0] / "gen1.png"
    broken.write_bytes(b"not an image")
    (generations / METHODS[0] / SUBJECTS[0] / "notes.txt").write_text("prompt notes")
    for path in (generations / METHODS[1] / SUBJECTS[1]).iterdir():  # a reference folder one method did not use
        path.unlink()
    result = evaluate.main(score_args(tiny_repo, tmp_path, "--references", str(references), "--generations",
                                      str(generations), "--skip-bad-images"))
    document = json.loads((tmp_path / "out" / "score_results.json").read_text())
    assert len(document["skipped"]) == 2 and document["counts"]["n_skipped"] == 2
    assert document["counts"]["skipped_by_reason"] == {"unreadable": 1, "not an image": 1}
    messages = {s["image"]: s["reason"] for s in document["skipped"]}
    assert any(str(broken) in image and "Could not decode" in reason for image, reason in messages.items())
    summary = (tmp_path / "out" / "score_summary.md").read_text()
    assert "2 images or files were left out (1 unreadable, 1 not an image)" in summary
    table = IdentityScorer(str(tiny_repo), device="cpu", skip_bad_images=True).score_folders(references, generations)
    assert table.markdown().replace("`ScoreTable.skipped`", "score_results.json") == summary  # one summary, two ways
    assert result["summary"][METHODS[0]]["subjects"][SUBJECTS[0]]["n_skipped"] == 1  # the tables still count it
