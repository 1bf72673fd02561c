"""evaluate.py retrieval: near-identity retrieval and clustering, on benchmarks whose answers are known.

The embeddings are drawn (`PixelScorer`): every view is a * scene + b * identity and every distractor
a * scene + b * its own identity, with orthogonal axes, so a view's similarity is b^2 to another view
of its row, a^2 to the distractor inpainted into its own scene, and 0 to everything else.
"""

import csv
import json

import datasets
import numpy as np
import pytest
from huggingface_hub import ModelCard

from nearid import options
from nearid.commands import evaluate
from nearid.data import nearid_benchmark
from tests.helpers import PixelScorer, draw_vector, serve_as_hub_datasets, user_error

DIM = 27
# Present views and distractors per row: row 0 has 3 views (no distractor in the third scene), row 1 two
# views, row 2 one view (never a query).
VIEWS = [(True, True, True), (True, True, False), (True, False, False)]
DISTRACTORS = [(True, True, False), (True, True, False), (True, False, False)]


def axis(number):
    vector = np.zeros(DIM)
    vector[number] = 1.0
    return vector


def write_benchmark(root, a, b, distractors=DISTRACTORS):
    """positives/ and flux/ save_to_disk folders of the drawn benchmark; split files test.json (all rows)."""
    identity, scene, twin = (lambda r: axis(r)), (lambda r, k: axis(3 + 3 * r + k)), (lambda r, k: axis(12 + 3 * r + k))
    image = datasets.Image()
    positives = {"id": [f"obj{r}" for r in range(3)]}
    source = {"id": list(positives["id"])}
    for k in range(3):
        positives[f"img{k + 1}"] = [draw_vector(a * scene(r, k) + b * identity(r)) if VIEWS[r][k] else None
                                    for r in range(3)]
        source[f"nimg{k + 1}"] = [draw_vector(a * scene(r, k) + b * twin(r, k)) if distractors[r][k] else None
                                  for r in range(3)]
    for name, columns in (("positives", positives), ("flux", source)):
        features = datasets.Features({c: datasets.Value("string") if c == "id" else image for c in columns})
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(root / name))
    (root / "test.json").write_text("[0, 1, 2]")
    return root


@pytest.fixture
def pixels(monkeypatch):
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer())


def run(root, out, *extra, positives=None, flux=None):
    return evaluate.main(["retrieval", "--model", "pixels", "--positives", positives or str(root / "positives"),
                          "--source", f"flux={flux or root / 'flux'}", "--split-file", str(root / "test.json"),
                          "--output-dir", str(out),
                          "--cache-dir", str(root / "cache"), *extra])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_hand_computed_values(tmp_path, pixels, monkeypatch):
    root = write_benchmark(tmp_path, a=0.8, b=0.6)  # the scene outweighs the identity
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\n---\n# a model\n")
    # Read as the Hub datasets at a recorded commit, so the card may file the results under them.
    hub = serve_as_hub_datasets(monkeypatch, {"someone/nearid-mini": root / "positives",
                                              "someone/nearid-mini-Flux": root / "flux"})
    scores = run(root, tmp_path / "out", "--model-index", str(card), positives=hub["someone/nearid-mini"],
                 flux=hub["someone/nearid-mini-Flux"])
    # Queries: row 0 views 1-3, row 1 views 1-2. A view with a distractor in its scene ranks it first, then
    # its other views: row 0 views 1, 2 find theirs at ranks 2 and 3 (AP (1/2 + 2/3) / 2), row 1 at rank 2
    # (AP 1/2). Row 0 view 3 has no distractor: its two views come first (AP 1).
    assert scores["n_queries"] == 5 and scores["n_gallery"] == 6 + 5
    assert scores["recall@1"] == pytest.approx(100 * 1 / 5)
    assert scores["recall@5"] == scores["recall@10"] == pytest.approx(100.0)
    assert scores["map"] == pytest.approx(100 * (7 / 12 + 7 / 12 + 1 + 1 / 2 + 1 / 2) / 5)
    assert scores["distractor_first_rate"] == pytest.approx(100 * 4 / 5)

    out = tmp_path / "out"
    rows = read_csv(out / "retrieval_per_query.csv")
    assert [r["first_relevant_rank"] for r in rows] == ["2", "2", "1", "2", "2"]
    assert [r["top1_is"] for r in rows] == ["own distractor"] * 2 + ["same identity"] + ["own distractor"] * 2
    assert rows[0]["query"] == "positives row 0 column img1" and rows[0]["top1"] == "source flux row 0 column nimg1"
    results = json.loads((out / "retrieval_results.json").read_text())
    assert results["metrics"]["map"] == pytest.approx(scores["map"])
    assert set(results["files"]) == {"retrieval_args.json", "retrieval_per_query.csv", "retrieval_table.md",
                                     "retrieval_scores.png"}
    assert "| pixels | 20.00 | 100.00 | 100.00 | 63.33 | 80.00 |" in (out / "retrieval_table.md").read_text()
    recorded = {r.metric_type: r.metric_value for r in ModelCard.load(card).data.eval_results}
    assert recorded == {"recall@1": 20.0, "map": 63.3333, "distractor_first_rate": 80.0}


def test_a_perfect_scorer(tmp_path, pixels):
    all_present = [(True, True, True), (True, True, False), (True, False, False)]
    scores = run(write_benchmark(tmp_path, a=0.6, b=0.8, distractors=all_present), tmp_path / "out")
    assert scores["recall@1"] == scores["map"] == pytest.approx(100.0)
    assert scores["distractor_first_rate"] == 0.0
    # Views of a row are b^2 = 0.64 alike, a view and its scene's distractor a^2 = 0.36: a threshold between
    # them clusters exactly the identities (each distractor alone).
    assert scores["cluster_ari"] == pytest.approx(1.0) and scores["cluster_nmi"] == pytest.approx(1.0)
    assert scores["n_clusters"] == scores["n_identities"] == 3 + 6
    # Every cut between the two similarities gives these clusters: the threshold is about the middle of them, not
    # an edge, where the last bits of a similarity would decide.
    assert 0.45 < scores["cluster_threshold"] < 0.55
    assert scores["cluster_threshold_split"] == "evaluated rows (no --val-split-file)"


def test_a_scorer_that_ranks_the_same_scene_distractor_first(tmp_path, pixels):
    all_present = [(True, True, True), (True, True, False), (True, False, False)]
    scores = run(write_benchmark(tmp_path, a=0.8, b=0.6, distractors=all_present), tmp_path / "out")
    assert scores["distractor_first_rate"] == pytest.approx(100.0) and scores["recall@1"] == 0.0
    assert scores["map"] == pytest.approx(100 * (3 * 7 / 12 + 2 * 1 / 2) / 5)


def naive_retrieval(bench, test_rows, embed):
    """Recall@k, mAP and DFR by a loop over queries; the gallery built from the datasets directly."""
    gallery = []  # (embedding, row, is_view)
    for row in test_rows:
        for column in bench.view_columns:
            image = bench.positives[row][column]
            if image is not None:
                gallery.append((embed(image), row, True))
        for name, columns in bench.distractor_columns.items():
            for column in columns:
                image = bench.sources[name][row][column]
                if image is not None:
                    gallery.append((embed(image), row, False))
    firsts, aps, distractor_first = [], [], []
    for q, (query, row, is_view) in enumerate(gallery):
        if not is_view or sum(g[1] == row and g[2] for g in gallery) < 2:
            continue
        ranked = sorted((i for i in range(len(gallery)) if i != q), key=lambda i: (-float(query @ gallery[i][0]), i))
        relevant = [gallery[i][1] == row and gallery[i][2] for i in ranked]
        hits = np.cumsum(relevant)
        firsts.append(relevant.index(True) + 1)
        aps.append(np.mean([hits[i] / (i + 1) for i in range(len(ranked)) if relevant[i]]))
        distractor_first.append(gallery[ranked[0]][1] == row and not gallery[ranked[0]][2])
    firsts = np.array(firsts)
    return {"recall@1": 100 * np.mean(firsts <= 1), "recall@5": 100 * np.mean(firsts <= 5),
            "recall@10": 100 * np.mean(firsts <= 10), "map": 100 * np.mean(aps),
            "distractor_first_rate": 100 * np.mean(distractor_first), "n_queries": len(firsts)}


def test_agrees_with_a_naive_loop_on_the_synthetic_benchmark(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(options, "load_scorer", lambda args, state: PixelScorer(side=64))
    scores = evaluate.main(["retrieval", "--model", "pixels", "--positives", str(synthetic / "positives"),
                            "--source", f"flux={synthetic / 'flux'}", "--source", f"sdxl={synthetic / 'sdxl'}",
                            "--split-file", str(synthetic / "splits" / "test.json"),
                            "--val-split-file", str(synthetic / "splits" / "val.json"),
                            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    bench, _ = nearid_benchmark.open_benchmark(str(synthetic / "positives"), {"flux": str(synthetic / "flux"),
                                                                              "sdxl": str(synthetic / "sdxl")})

    def embed(image):
        pixels = np.asarray(image.convert("RGB"), np.float64).reshape(-1) - 128
        return pixels / np.linalg.norm(pixels)

    expected = naive_retrieval(bench, json.loads((synthetic / "splits" / "test.json").read_text()), embed)
    assert {key: scores[key] for key in expected} == pytest.approx(expected)
    assert scores["cluster_threshold_split"] == "val split"


def test_overlapping_splits_and_rows_without_queries_are_short_errors(tmp_path, pixels, capsys):
    root = write_benchmark(tmp_path, a=0.6, b=0.8)
    argv = ["retrieval", "--model", "pixels", "--positives", str(root / "positives"), "--source",
            f"flux={root / 'flux'}", "--output-dir", str(tmp_path / "out"), "--cache-dir", str(root / "cache")]
    (root / "val.json").write_text("[1]")
    message = user_error(capsys, evaluate.main, [*argv, "--split-file", str(root / "test.json"),
                                                 "--val-split-file", str(root / "val.json")])
    assert "--split-file" in message and "--val-split-file" in message and "1" in message
    (root / "single.json").write_text("[2]")  # row 2 has one view: nothing to retrieve
    assert "no retrieval query" in user_error(capsys, evaluate.main, [*argv, "--split-file", str(root / "single.json")])
