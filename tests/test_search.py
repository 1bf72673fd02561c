"""Identity search: the Python API (`nearid.search`) and `search.py index / query / cluster` end to end.

Most tests embed with `PixelScorer` (an image's pixels are its embedding), so the gallery's identities,
nearest neighbours and clusters are known by construction; one test runs a real NearID model.
"""

import csv
import json
import os
import shutil

import datasets
import numpy as np
import pytest

from nearid import options, search_reports
from nearid.commands import search
from nearid.ann import IndexSettings, recall_against_exact
from nearid.io import set_aside_path
from nearid.search import (
    DatasetColumn,
    Embedder,
    SearchIndex,
    SearchIndexMismatch,
)
from nearid.store.embedding_store import EmbeddingStore
from tests.helpers import PixelScorer, draw_vector, user_error

IDENTITIES, PER_IDENTITY, DIM = 4, 3, 27


def identity_image(identity, number):
    """Image `number` of `identity`: its own axis plus a little noise (same identity ~0.8, others ~0)."""
    noise = np.random.default_rng(100 * identity + number).uniform(-0.15, 0.15, DIM)
    noise[identity] = 1.0
    return draw_vector(noise)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """gallery/id<i>/img<j>.png for 4 identities x 3 images, an exact copy of id0/img0, and a text file."""
    root = tmp_path_factory.mktemp("gallery")
    for identity in range(IDENTITIES):
        (root / f"id{identity}").mkdir()
        for number in range(PER_IDENTITY):
            identity_image(identity, number).save(root / f"id{identity}" / f"img{number}.png")
    shutil.copy(root / "id0" / "img0.png", root / "id0" / "copy.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def pixels(monkeypatch):
    """search.py embeds with PixelScorer whatever --model says."""
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer())


def new_index(tmp_path, **settings):
    return SearchIndex.create(Embedder(PixelScorer(), tmp_path / "cache"), IndexSettings(**settings))


def identity_of(path):
    return str(path).split("/")[-2]


def brute_force(index, queries, k):
    """Top-k rows and scores of [Q, D] queries by numpy over the gallery's stored vectors."""
    sims = queries @ index.vectors().astype(np.float32).T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, 1), rows


# --------------------------------------------------------------------------------------------------
# The Python API


def test_add_search_combine_and_cluster(tmp_path, gallery):
    index = new_index(tmp_path)
    report = index.add([gallery])
    assert report["images"] == 13 and report["embedded"] == 12  # the copy has the bytes of id0/img0
    assert [item["image"] for item in report["ignored"]] == [str(gallery / "notes.txt")]
    paths = [entry["path"] for entry in index.entries()]
    assert paths == sorted(str(p) for p in gallery.rglob("*.png"))

    queries = [gallery / "id1" / "img0.png", gallery / "id2" / "img2.png"]
    names, vectors, skipped = index.embed_queries(queries)
    assert names == [str(q) for q in queries] and not skipped
    result = index.search(queries, k=3)
    expected_scores, expected_rows = brute_force(index, vectors, 3)
    np.testing.assert_array_equal(result.rows, expected_rows)
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-5)
    for query, rows in zip(queries, result.rows):
        assert paths[rows[0]] == str(query)  # itself first
        assert {identity_of(paths[r]) for r in rows} == {identity_of(query)}

    mean = vectors.mean(0, keepdims=True)
    scores, rows = brute_force(index, mean / np.linalg.norm(mean), 5)
    by_mean = index.search(queries, k=5, combine="mean")
    assert by_mean.queries == [names] and by_mean.rows.tolist() == rows.tolist()
    sims = (vectors @ index.vectors().astype(np.float32).T).max(0)
    by_max = index.search(vectors, k=5, combine="max")
    assert by_max.rows[0].tolist() == np.argsort(-sims, kind="stable")[:5].tolist()
    np.testing.assert_allclose(by_max.scores[0], np.sort(sims)[::-1][:5], atol=1e-5)

    labels = index.cluster(0.5)
    assert len(set(labels)) == IDENTITIES
    assert all(len({identity_of(p) for p, label in zip(paths, labels) if label == c}) == 1 for c in set(labels))
    assert labels[paths.index(str(gallery / "id0" / "copy.png"))] == 0  # the largest cluster comes first


def test_k_beyond_the_gallery_is_clamped(tmp_path, gallery):
    index = new_index(tmp_path)
    index.add([gallery / "id1"])
    result = index.search([gallery / "id1" / "img0.png"], k=10)
    assert result.clamped and result.k == 3 and result.requested_k == 10 and (result.rows >= 0).all()


def test_save_load_and_a_scorer_of_another_model_is_refused(tmp_path, gallery):
    index = new_index(tmp_path)
    index.add([gallery])
    before = index.search([gallery / "id3" / "img1.png"], k=4)
    folder = index.save(tmp_path / "index")
    assert sorted(p.name for p in folder.iterdir()) == ["faiss.index", "gallery", "search_index.json"]
    info = json.loads((folder / "search_index.json").read_text())
    assert info["images"] == 13 and info["dim"] == DIM and info["fingerprint"] == "pixels-3x3"
    assert info["bytes_per_image"]["faiss_index"] >= 4 * DIM and info["bytes_per_image"]["gallery"] >= 2 * DIM

    loaded = SearchIndex.load(folder, Embedder(PixelScorer(), tmp_path / "cache"))
    after = loaded.search([gallery / "id3" / "img1.png"], k=4)
    assert after.rows.tolist() == before.rows.tolist() and loaded.entries() == index.entries()
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())
    with pytest.raises(SearchIndexMismatch, match="fingerprint pixels-3x3.*fingerprint pixels-2x2"):
        SearchIndex.load(folder, Embedder(PixelScorer(side=2), tmp_path / "cache"))
    with pytest.raises(SearchIndexMismatch, match=r"\[Q, 27\].*\[1, 12\]"):
        loaded.search(np.ones((1, 12), np.float32))


def test_sync_embeds_only_new_images_and_removed_ones_leave(tmp_path, gallery):
    folder = shutil.copytree(gallery, tmp_path / "gallery")
    index = new_index(tmp_path)
    index.sync([folder])
    index.save(tmp_path / "index")
    identity_image(2, 7).save(folder / "id2" / "new.png")
    (folder / "id1" / "img1.png").unlink()

    index = SearchIndex.load(tmp_path / "index", Embedder(PixelScorer(), tmp_path / "cache"))
    report = index.sync([folder])
    assert (report["added"], report["removed"], report["embedded"], report["reused"]) == (1, 1, 1, 12)
    paths = {entry["path"] for entry in index.entries()}
    assert str(folder / "id2" / "new.png") in paths and str(folder / "id1" / "img1.png") not in paths
    assert index.search([folder / "id2" / "new.png"], k=1).rows[0, 0] == sorted(paths).index(
        str(folder / "id2" / "new.png"))
    report = index.add([gallery / "id1" / "img1.png"])  # add keeps what is there
    assert (report["images"], report["added"], report["removed"], report["embedded"]) == (14, 1, 0, 0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_measure_their_recall(tmp_path, gallery, kind):
    index = new_index(tmp_path, kind=kind)
    index.add([gallery])
    result = index.search([gallery / "id2" / "img0.png"], k=5)
    exact = new_index(tmp_path)
    exact.add([gallery])
    assert result.rows.tolist() == exact.search([gallery / "id2" / "img0.png"], k=5).rows.tolist()
    assert index.recall == 1.0  # a gallery this small is searched whole
    info = json.loads((index.save(tmp_path / "index") / "search_index.json").read_text())
    assert info["recall_at_10"] == 1.0 and info["settings"]["kind"] == kind


def test_recall_against_exact_counts_the_exact_neighbours_found():
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    index = IndexSettings("ivf", nlist=32, nprobe=1).new_index(16, len(vectors))
    index.train(vectors)
    index.add(vectors)
    recall = recall_against_exact(index, vectors, k=10, sample=200, seed=3)
    queries = vectors[np.sort(np.random.default_rng(3).choice(2000, 200, replace=False))]
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = index.search(queries, 10)[1]
    assert 0.2 < recall < 0.99
    assert recall == pytest.approx(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)]))
    assert isinstance(faiss.extract_index_ivf(index), faiss.IndexIVF)


def drawn_dataset(folder, missing_row=2):
    """A save_to_disk dataset whose "image" column holds identity images; one row has no image."""
    images = [identity_image(i % IDENTITIES, i // IDENTITIES) for i in range(8)]
    images[missing_row] = None
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    dataset.save_to_disk(str(folder))
    return datasets.load_from_disk(str(folder))


def test_a_dataset_column_is_indexed_by_row(tmp_path):
    dataset = drawn_dataset(tmp_path / "drawn")
    index = new_index(tmp_path)
    report = index.add(datasets=[DatasetColumn(str(tmp_path / "drawn"), dataset, "image")])
    assert report["images"] == 7 and report["skipped"] == [
        {"image": f"{tmp_path / 'drawn'} row 2 column image", "reason": "no image in this row"}]
    assert [e["row"] for e in index.entries()] == [0, 1, 3, 4, 5, 6, 7]
    index.save(tmp_path / "index")
    loaded = SearchIndex.load(tmp_path / "index")  # no scorer needed to search vectors or show images
    assert np.array_equal(np.asarray(loaded.image(2)), np.asarray(identity_image(3, 0)))  # gallery row 2 = row 3
    assert loaded.search(loaded.vectors()[:1].astype(np.float32), k=1).rows[0, 0] == 0


# --------------------------------------------------------------------------------------------------
# search.py


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_index_query_and_cluster_commands(tmp_path, gallery, pixels, capsys):
    index_dir, cache = tmp_path / "index", tmp_path / "cache"
    search.main(["index", "--model", "pixels", "--images", str(gallery), "--index-dir", str(index_dir),
                 "--cache-dir", str(cache)])
    assert "Indexed 13 images" in capsys.readouterr().out
    assert (index_dir / "index_args.json").is_file()

    out = tmp_path / "query"
    queries = [str(gallery / "id1" / "img2.png"), str(gallery / "id3")]
    query = ["query", "--index-dir", str(index_dir), "--cache-dir", str(cache), "--output-dir", str(out)]
    search.main([*query, "--images", *queries, "--k", "3"])
    rows = read_csv(out / "query_results.csv")
    assert len(rows) == 4 * 3 and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    for group in range(4):
        hits = [r for r in rows if r["query_group"] == str(group)]
        assert hits[0]["path"] == hits[0]["queries"] and {identity_of(h["path"]) for h in hits} == {
            identity_of(hits[0]["queries"])}
    results = json.loads((out / "query_results.json").read_text())
    assert results["metrics"]["k"] == 3 and len(results["results"]) == 12
    assert set(results["files"]) == {"query_args.json", "query_results.csv", "query_contact_sheet.png"}
    assert (out / "query_contact_sheet.png").stat().st_size > 1000

    search.main([*query, "--images", str(gallery / "id2"), "--combine", "max", "--k", "50"])
    assert "k = 50 is more than the gallery's 13 images: all 13 are returned" in capsys.readouterr().out
    results = json.loads((out / "query_results.json").read_text())
    assert (results["metrics"]["requested_k"], results["metrics"]["k"], results["metrics"]["n_query_groups"]) == \
        (50, 13, 1)

    clusters_out = tmp_path / "clusters"
    search.main(["cluster", "--index-dir", str(index_dir), "--threshold", "0.5", "--sheet-min-size", "3",
                 "--output-dir", str(clusters_out)])
    rows = read_csv(clusters_out / "clusters.csv")
    by_cluster = {}
    for row in rows:
        by_cluster.setdefault(row["cluster"], set()).add(identity_of(row["path"]))
    assert len(by_cluster) == IDENTITIES and all(len(ids) == 1 for ids in by_cluster.values())
    duplicates = [row["path"] for row in rows if row["near_duplicate_group"]]
    assert duplicates == [str(gallery / "id0" / "copy.png"), str(gallery / "id0" / "img0.png")]
    results = json.loads((clusters_out / "cluster_results.json").read_text())
    assert results["metrics"]["n_clusters"] == IDENTITIES and len(results["near_duplicates"]) == 1
    assert sorted(p.name for p in (clusters_out / "cluster_sheets").iterdir()) == [
        f"cluster_{c:04d}.png" for c in range(IDENTITIES)]


def test_index_a_dataset_column_and_query_it(tmp_path, pixels):
    drawn_dataset(tmp_path / "drawn")
    search.main(["index", "--model", "pixels", "--dataset", str(tmp_path / "drawn"), "--column", "image",
                 "--index-dir", str(tmp_path / "index"), "--cache-dir", str(tmp_path / "cache")])
    identity_image(1, 5).save(tmp_path / "query.png")
    search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", str(tmp_path / "query.png"), "--k", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])
    rows = read_csv(tmp_path / "out" / "query_results.csv")
    assert [r["image"] for r in rows] == [f"{tmp_path / 'drawn'} [train] row {row} column image" for row in (1, 5)]
    info = json.loads((tmp_path / "index" / "search_index.json").read_text())
    assert [s["reason"] for s in info["skipped"]] == ["no image in this row"]


# --------------------------------------------------------------------------------------------------
# Bad input


def test_unreadable_images_stop_the_index_or_are_skipped_and_listed(tmp_path, gallery, pixels, capsys):
    folder = shutil.copytree(gallery, tmp_path / "gallery")
    (folder / "id1" / "broken.png").write_bytes(b"not a png")
    argv = ["index", "--model", "pixels", "--images", str(folder), "--index-dir", str(tmp_path / "index"),
            "--cache-dir", str(tmp_path / "cache")]
    message = user_error(capsys, search.main, argv)
    assert "broken.png" in message and "--skip-bad-images" in message
    assert not (tmp_path / "index").exists()
    search.main([*argv, "--skip-bad-images"])
    assert "1 unreadable images and 1 other files were left out" in capsys.readouterr().out
    info = json.loads((tmp_path / "index" / "search_index.json").read_text())
    assert info["images"] == 13 and [s["image"] for s in info["skipped"]] == [f"image file {str(folder / 'id1' / 'broken.png')!r}"]


def test_bad_index_and_query_input_is_a_short_error(tmp_path, gallery, pixels, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    index = ["index", "--model", "pixels", "--index-dir", str(tmp_path / "index"), "--cache-dir", str(tmp_path / "c")]
    assert "no images in" in user_error(capsys, search.main, [*index, "--images", str(tmp_path / "empty")])
    assert "needs a gallery" in user_error(capsys, search.main, index)
    drawn_dataset(tmp_path / "drawn")
    message = user_error(capsys, search.main, [*index, "--dataset", str(tmp_path / "drawn"), "--column", "nope"])
    assert "lacks columns ['nope']" in message
    not_an_index = ["index", "--model", "pixels", "--images", str(gallery), "--index-dir", str(gallery / "id0")]
    assert "is not a search index" in user_error(capsys, search.main, [*not_an_index, "--overwrite"])
    assert (gallery / "id0" / "img0.png").is_file()  # a folder that is not an index is never replaced
    missing = str(tmp_path / "nowhere")
    for argv in (["query", "--index-dir", missing, "--images", str(gallery)], ["cluster", "--index-dir", missing]):
        assert f"no search index in {missing}" in user_error(capsys, search.main, argv)

    search.main([*index, "--images", str(gallery / "id0")])
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer(side=2))
    query = ["query", "--index-dir", str(tmp_path / "index"), "--images", str(gallery / "id0"), "--model", "other",
             "--cache-dir", str(tmp_path / "c")]
    message = user_error(capsys, search.main, query)
    assert "fingerprint pixels-3x3" in message and "fingerprint pixels-2x2" in message
    message = user_error(capsys, search.main, [*index, "--images", str(gallery / "id0")])
    assert "pixels-2x2" in message and "--overwrite" in message


def test_an_interrupted_index_run_resumes_and_never_leaves_a_half_written_index(tmp_path, gallery, pixels, capsys,
                                                                              monkeypatch):
    folder = shutil.copytree(gallery, tmp_path / "gallery")
    (folder / "id3" / "broken.png").write_bytes(b"not a png")
    argv = ["index", "--model", "pixels", "--images", str(folder), "--index-dir", str(tmp_path / "index"),
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "1"]
    user_error(capsys, search.main, argv)  # stops at the broken image; the images before it are kept
    done = len(EmbeddingStore.open(tmp_path / "cache", PixelScorer().fingerprint))
    (folder / "id3" / "broken.png").unlink()
    assert 0 < done and search.main(argv)["embedded"] == 12 - done

    identity_image(0, 9).save(folder / "id0" / "new.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search.main(argv)
    monkeypatch.undo()
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer())
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".index.lock")  # the lock file stays, unlocked
    assert left == ["cache", "gallery", "index"]  # no staging folder left
    assert len(SearchIndex.load(tmp_path / "index")) == 13  # the previous index, complete
    assert search.main(argv)["images"] == 14


def test_an_index_a_killed_save_left_set_aside_is_put_back_before_the_next_run(tmp_path, gallery, pixels, capsys,
                                                                              monkeypatch):
    index = tmp_path / "index"
    argv = ["index", "--model", "pixels", "--images", str(gallery / "id0"), "--index-dir", str(index),
            "--cache-dir", str(tmp_path / "cache")]
    search.main(argv)
    os.replace(index, set_aside_path(index))  # killed between setting the old index aside and renaming the new in
    query = ["query", "--index-dir", str(index), "--images", str(gallery / "id0" / "img0.png")]
    assert "rename it back" in user_error(capsys, search.main, query)
    # The next writer puts it back first, so another scorer is refused as for any existing index, not given a
    # new index in its place.
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer(side=2))
    message = user_error(capsys, search.main, [*argv[:-1], str(tmp_path / "other-cache")])
    assert "pixels-3x3" in message and "pixels-2x2" in message, message
    assert (index / "search_index.json").is_file() and not set_aside_path(index).exists()


def test_a_real_model_indexes_and_queries_with_its_own_scorer(tmp_path, gallery, tiny_repo, capsys):
    from nearid.hub import export_hub_folder
    from tests.helpers import make_tiny_nearid, make_tiny_processor

    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    search.main(["index", "--model", str(tiny_repo), "--images", str(gallery / "id1"), str(gallery / "id2"),
                 "--index-dir", str(tmp_path / "index"), *common])
    result = search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", str(gallery / "id1" / "img0.png"),
                          "--k", "1", "--output-dir", str(tmp_path / "out"), *common])
    assert result["records"][0]["path"] == str(gallery / "id1" / "img0.png")
    other = export_hub_folder(make_tiny_nearid(seed=1), make_tiny_processor(), tmp_path / "other")
    message = user_error(capsys, search.main, ["query", "--index-dir", str(tmp_path / "index"), "--model", str(other),
                                               "--images", str(gallery / "id1"), *common])
    assert "was built with" in message and "cannot be compared" in message


# --------------------------------------------------------------------------------------------------
# Edges where a result could be silently wrong


def nan_rows(folder, rows):
    """Save the index in `folder` again with NaN embeddings at gallery `rows` (a damaged gallery)."""
    from nearid.search import _gallery

    index = SearchIndex.load(folder)
    vectors = index.vectors().copy()
    vectors[rows] = np.nan
    entries = index.entries()
    index.gallery = _gallery(entries, [entry["hash"] for entry in entries], vectors)
    index._faiss_file = None
    index.save(folder)


def test_nan_gallery_embeddings_are_refused_naming_the_images_and_indexing_again_repairs_them(
        tmp_path, gallery, pixels, capsys):
    index_dir, cache = tmp_path / "index", tmp_path / "cache"
    index = ["index", "--model", "pixels", "--images", str(gallery), "--index-dir", str(index_dir),
             "--cache-dir", str(cache)]
    search.main(index)
    nan_rows(index_dir, [1, 5])
    damaged = [SearchIndex.load(index_dir).entries()[row]["path"] for row in (1, 5)]
    query = ["query", "--index-dir", str(index_dir), "--images", str(gallery / "id1" / "img0.png"), "--k", "50",
             "--cache-dir", str(cache), "--output-dir", str(tmp_path / "query")]
    for argv in (query, ["cluster", "--index-dir", str(index_dir), "--output-dir", str(tmp_path / "clusters")]):
        message = user_error(capsys, search.main, argv)
        assert "2 of its 13 images" in message and damaged[0] in message and "search.py index" in message
    assert not (tmp_path / "query").exists() and not (tmp_path / "clusters").exists()
    with pytest.raises(ValueError, match="not finite"):
        SearchIndex.load(index_dir).cluster(0.5)

    assert search.main(index)["images"] == 13  # the damaged rows take their embeddings again
    result = search.main(query)
    assert len(result["records"]) == 13 and {r["path"] for r in result["records"]} >= set(damaged)
    assert "all 13 are returned" in capsys.readouterr().out


def test_a_threshold_that_is_not_a_number_or_below_the_cluster_threshold_is_refused(tmp_path, capsys):
    cluster = ["cluster", "--index-dir", str(tmp_path / "index")]
    message = user_error(capsys, search.main, [*cluster, "--threshold", "nan"], status=2)
    assert "--threshold" in message and "finite number" in message
    message = user_error(capsys, search.main, [*cluster, "--threshold", "0.9", "--duplicate-threshold", "0.8"],
                         status=2)
    assert "--duplicate-threshold 0.8" in message and "--threshold 0.9" in message


def test_hits_of_gallery_files_deleted_since_indexing_are_warned_about(tmp_path, gallery, pixels, capsys):
    folder = shutil.copytree(gallery, tmp_path / "gallery")
    search.main(["index", "--model", "pixels", "--images", str(folder), "--index-dir", str(tmp_path / "index"),
                 "--cache-dir", str(tmp_path / "cache")])
    gone = folder / "id2" / "img1.png"
    gone.unlink()
    capsys.readouterr()
    search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", str(folder / "id2" / "img0.png"),
                 "--k", "3", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "warning:" in err and str(gone) in err and "search.py index" in err
    results = json.loads((tmp_path / "out" / "query_results.json").read_text())
    assert any(str(gone) in warning for warning in results["warnings"])


def test_an_unreadable_query_is_named_as_a_query_even_with_skip_bad_images(tmp_path, gallery, pixels, capsys):
    search.main(["index", "--model", "pixels", "--images", str(gallery / "id0"), "--index-dir",
                 str(tmp_path / "index"), "--cache-dir", str(tmp_path / "cache")])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    query = ["query", "--index-dir", str(tmp_path / "index"), "--images", str(tmp_path / "broken.png"),
             "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    message = user_error(capsys, search.main, [*query, "--skip-bad-images"])
    assert "broken.png" in message and "query" in message and "--skip-bad-images" not in message
    message = user_error(capsys, search.main, query)
    assert "broken.png" in message and "--skip-bad-images" in message  # skipping it would leave no query
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    message = user_error(capsys, search.main, ["index", "--model", "pixels", "--images", str(tmp_path / "bad"),
                                               "--index-dir", str(tmp_path / "other"), "--skip-bad-images",
                                               "--cache-dir", str(tmp_path / "cache")])
    assert "broken.png" in message and "--skip-bad-images" not in message


def test_empty_dataset_cells_are_counted_apart_from_unreadable_images(tmp_path, pixels, capsys):
    from tests.helpers import corrupt_image

    dataset = drawn_dataset(tmp_path / "drawn", missing_row=2)
    corrupt_image(dataset, 5, "image").save_to_disk(str(tmp_path / "damaged"))
    search.main(["index", "--model", "pixels", "--dataset", str(tmp_path / "damaged"), "--column", "image",
                 "--index-dir", str(tmp_path / "index"), "--cache-dir", str(tmp_path / "cache"), "--skip-bad-images"])
    out = capsys.readouterr().out
    assert "Indexed 6 images" in out and "1 unreadable images" in out and "1 empty dataset cells" in out


def test_a_broken_link_in_the_gallery_is_listed_and_one_given_as_a_query_is_named(tmp_path, gallery, pixels,
                                                                                    capsys):
    folder = shutil.copytree(gallery, tmp_path / "gallery")
    (folder / "id1" / "gone.png").symlink_to(tmp_path / "deleted.png")
    search.main(["index", "--model", "pixels", "--images", str(folder), "--index-dir", str(tmp_path / "index"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert "2 other files were left out" in capsys.readouterr().out
    info = json.loads((tmp_path / "index" / "search_index.json").read_text())
    reasons = {item["image"]: item["reason"] for item in info["provenance"]["extra"]["last_update"]["ignored"]}
    assert "deleted.png, which does not exist" in reasons[str(folder / "id1" / "gone.png")]
    message = user_error(capsys, search.main, ["query", "--index-dir", str(tmp_path / "index"), "--images",
                                               str(folder / "id1" / "gone.png"), "--cache-dir", str(tmp_path / "cache"),
                                               "--output-dir", str(tmp_path / "out")])
    assert "gone.png is a link to" in message and "which does not exist" in message


def test_an_index_dir_below_a_file_is_refused_before_anything_is_embedded(tmp_path, gallery, pixels, capsys):
    (tmp_path / "taken").write_text("kept")
    message = user_error(capsys, search.main, ["index", "--model", "pixels", "--images", str(gallery),
                                               "--index-dir", str(tmp_path / "taken" / "index"),
                                               "--cache-dir", str(tmp_path / "cache")], status=2)
    assert "--index-dir" in message and f"{tmp_path / 'taken'} is a file" in message
    assert not (tmp_path / "cache").exists()


def test_an_index_of_a_relative_model_folder_is_queried_from_any_folder(tmp_path, gallery, tiny_repo, monkeypatch):
    # Read from another folder, "runs/model" would be a Hub id: the index keeps the folder's absolute path.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(tiny_repo, project / "runs" / "model")
    elsewhere.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    monkeypatch.chdir(project)
    search.main(["index", "--model", "runs/model", "--images", str(gallery / "id1"), "--index-dir",
                 str(tmp_path / "index"), *common])
    monkeypatch.chdir(elsewhere)
    result = search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", str(gallery / "id1" / "img0.png"),
                          "--k", "1", "--output-dir", str(tmp_path / "out"), *common])
    assert result["records"][0]["path"] == str(gallery / "id1" / "img0.png")
    scorer = json.loads((tmp_path / "index" / "search_index.json").read_text())["scorer"]
    assert scorer["path"] == str((project / "runs" / "model").resolve())


def test_an_index_of_a_hub_model_is_queried_at_the_commit_it_was_built_with(tmp_path, gallery, tiny_repo, monkeypatch):
    from nearid.hub import export_hub_folder
    from tests.helpers import make_tiny_nearid, make_tiny_processor

    # The Hub cache's layout, built by hand: main moves to a new commit after the index is built.
    repo, first, second = tmp_path / "hub" / "models--someone--nearid", "a" * 40, "b" * 40
    shutil.copytree(tiny_repo, repo / "snapshots" / first)
    export_hub_folder(make_tiny_nearid(seed=1), make_tiny_processor(), repo / "snapshots" / second)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    search.main(["index", "--model", "someone/nearid", "--images", str(gallery / "id1"), "--index-dir",
                 str(tmp_path / "index"), *common])
    (repo / "refs" / "main").write_text(second)
    result = search.main(["query", "--index-dir", str(tmp_path / "index"), "--images", str(gallery / "id1" / "img0.png"),
                          "--k", "1", "--output-dir", str(tmp_path / "out"), *common])
    assert result["records"][0]["path"] == str(gallery / "id1" / "img0.png")


def test_index_summary_agrees_with_search_index_json_and_says_where_embeddings_came_from(tmp_path, gallery, pixels,
                                                                                         capsys):
    common = ["index", "--model", "pixels", "--images", str(gallery), "--cache-dir", str(tmp_path / "cache")]
    search.main([*common, "--index-dir", str(tmp_path / "first")])
    assert "12 computed now, 0 read from the embed-once store" in capsys.readouterr().out
    report = search.main([*common, "--index-dir", str(tmp_path / "second")])  # a new index, the same store
    out = capsys.readouterr().out
    assert report["from_store"] == 12 and report["embedded"] == 0
    store = tmp_path / "cache"
    assert f"13 new, 0 removed. Embeddings: 0 computed now, 12 read from the embed-once store ({store})" in out
    info = json.loads((tmp_path / "second" / "search_index.json").read_text())
    assert [item["image"] for item in info["ignored"]] == [str(gallery / "notes.txt")] and info["skipped"] == []
    assert "0 unreadable images and 1 other files were left out" in out and '"ignored": 1' in out


def test_contact_sheet_captions_keep_the_method_folder_and_the_file(tmp_path):
    root = tmp_path / "a_long_project_folder" / "generations"
    for method in ("blip_diffusion", "emu2"):
        for number in range(2):
            folder = root / method / "tgt_image" / "object_00_red_crate"
            folder.mkdir(parents=True, exist_ok=True)
            identity_image(0, number).save(folder / f"{number}_0.png")
    index = new_index(tmp_path)
    index.add([root])
    result = index.search([root / "emu2" / "tgt_image" / "object_00_red_crate" / "0_0.png"], 4, "each")
    captions = [caption for row in search_reports.query_sheet(index, result) for _, caption in row]
    assert captions[0] == "query\nemu2/tgt_image/\nobject_00_red_crate/\n0_0.png"
    hits = [caption.split("\n", 1)[1] for caption in captions[1:]]
    assert {hit.split("/")[0] for hit in hits} == {"blip_diffusion", "emu2"} and len(hits) == 4
    assert all(len(line) <= 25 for caption in captions for line in caption.split("\n"))
    long = search_reports.sheet_captions([f"/x/{'folder_' * 6}/{'deeper_' * 5}/{'file_' * 8}{n}.png" for n in (1, 2)])
    assert all(caption.endswith(f"file_file_{n}.png") and "\u2026" in caption
               for n, caption in zip((1, 2), long.values()))  # what does not fit loses its start, not its end
