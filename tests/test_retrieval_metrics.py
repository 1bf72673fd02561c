"""Near-identity retrieval metrics and identity clustering on inputs with known answers, and against naive loops."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from nearid import clustering
from nearid.metrics import clustering_scores, retrieval_per_query, retrieval_scores

NEG = -np.inf


def test_ranks_precision_and_distractor_first_by_hand():
    # Gallery: 0 = the query itself (excluded), 1 = its own distractor, 2 and 3 = its other views, 4 = another row.
    sims = np.array([[NEG, 0.9, 0.8, 0.5, 0.7],
                     [0.8, 0.1, NEG, 0.2, 0.9]])
    relevant = np.array([[0, 0, 1, 1, 0],
                         [1, 0, 0, 1, 0]], bool)
    own = np.array([[0, 1, 0, 0, 0],
                    [0, 1, 0, 0, 0]], bool)
    result = retrieval_per_query(sims, relevant, own)
    # Query 0 ranks 1, 2*, 4, 3*: relevant at 2 and 4, AP = (1/2 + 2/4) / 2. Query 1 ranks 4, 0*, 3*, 1.
    np.testing.assert_array_equal(result["first_relevant_rank"], [2, 2])
    np.testing.assert_allclose(result["average_precision"], [(1 / 2 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2])
    np.testing.assert_array_equal(result["top1"], [1, 4])
    np.testing.assert_array_equal(result["top1_own_distractor"], [True, False])
    np.testing.assert_allclose(result["top1_score"], [0.9, 0.9])

    scores = retrieval_scores(result["first_relevant_rank"], result["average_precision"],
                              result["top1_own_distractor"], ks=(1, 2))
    assert scores == pytest.approx({"recall@1": 0.0, "recall@2": 100.0, "map": 100 * (0.5 + 7 / 12) / 2,
                                    "distractor_first_rate": 50.0, "n_queries": 2})


def naive_per_query(sims, relevant, own):
    """One query at a time: sort (-similarity, gallery index), walk the ranking."""
    out = {"first_relevant_rank": [], "average_precision": [], "top1": [], "top1_own_distractor": []}
    for q in range(len(sims)):
        ranking = sorted(range(sims.shape[1]), key=lambda j: (-sims[q, j], j))
        hits, precisions = 0, []
        for rank, j in enumerate(ranking, start=1):
            if relevant[q, j]:
                hits += 1
                precisions.append(hits / rank)
        out["first_relevant_rank"].append(next(r for r, j in enumerate(ranking, 1) if relevant[q, j]))
        out["average_precision"].append(sum(precisions) / len(precisions))
        out["top1"].append(ranking[0])
        out["top1_own_distractor"].append(own[q, ranking[0]])
    return out


def test_matches_a_naive_loop_with_ties_and_exclusions():
    rng = np.random.default_rng(0)
    sims = np.round(rng.uniform(-1, 1, (40, 30)), 1)  # one decimal: many ties, broken by gallery order
    sims[np.arange(40), rng.integers(0, 30, 40)] = NEG
    relevant = (rng.random((40, 30)) < 0.15) & np.isfinite(sims)
    relevant[np.arange(40), np.argmax(np.isfinite(sims), axis=1)] = True  # at least one each
    own = rng.random((40, 30)) < 0.1
    result, expected = retrieval_per_query(sims, relevant, own), naive_per_query(sims, relevant, own)
    for name, values in expected.items():
        np.testing.assert_allclose(result[name], values, err_msg=name)


def test_a_query_without_a_visible_relevant_item_is_an_error():
    with pytest.raises(ValueError, match="query 1 has no relevant item"):
        retrieval_per_query([[0.5, 0.2], [0.1, 0.3]], [[True, False], [False, False]], np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="query 0"):
        retrieval_per_query([[NEG, 0.2]], [[True, False]], [[False, False]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_per_query([[np.nan, 0.2]], [[False, True]], [[False, False]])


def test_no_queries_give_nan():
    scores = retrieval_scores([], [], [])
    assert scores["n_queries"] == 0 and np.isnan(scores["map"]) and np.isnan(scores["recall@1"])


def test_clustering_scores_of_identical_and_opposite_partitions():
    assert clustering_scores([0, 0, 1, 1, 2], [5, 5, 7, 7, 9]) == pytest.approx(
        {"ari": 1.0, "nmi": 1.0, "n_clusters": 3, "n_identities": 3, "n_items": 5})
    everything_together = clustering_scores([0, 0, 1, 1], [0, 0, 0, 0])
    assert everything_together["ari"] == pytest.approx(0.0) and everything_together["n_clusters"] == 1


# --------------------------------------------------------------------------------------------------
# Clustering


def clustered_vectors(groups=25, size=6, dim=16, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    vectors = np.repeat(rng.normal(size=(groups, dim)), size, axis=0) + noise * rng.normal(size=(groups * size, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7, 0.9])
def test_linkage_per_linked_group_equals_one_linkage_of_everything(threshold):
    vectors = clustered_vectors()
    whole = fcluster(linkage(vectors.astype(np.float64), method="average", metric="cosine"), 1 - threshold,
                     criterion="distance")
    # Few pairs per block: the groups are merged across many blocks of the range search.
    linked = clustering.IdentityLinkage(vectors, threshold)
    assert clustering_scores(whole, linked.labels(threshold))["ari"] == pytest.approx(1.0)
    for edges in (2**25, 500):
        groups = clustering.linked_groups(vectors, threshold, edges_per_step=edges)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(vectors)))
        group_of = np.empty(len(vectors), int)
        for number, members in enumerate(groups):
            group_of[members] = number
        assert all(len(set(group_of[whole == cluster])) == 1 for cluster in set(whole))  # never split


def test_one_linkage_cuts_at_every_threshold_above_its_minimum():
    vectors = clustered_vectors()
    linked = clustering.IdentityLinkage(vectors, 0.3)
    assert len(set(linked.labels(0.9))) > len(set(linked.labels(0.5))) > len(set(linked.labels(0.3)))
    with pytest.raises(ValueError, match=">= 0.3"):
        linked.labels(0.2)


def test_clusters_are_numbered_by_size():
    vectors = np.array([[1, 0], [0, 1], [0, 1], [0.99, 0.14], [0, 1]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_array_equal(clustering.IdentityLinkage(vectors).labels(0.9), [1, 0, 0, 1, 0])


def test_candidate_thresholds_lie_among_neighbour_similarities():
    vectors = clustered_vectors()
    candidates = clustering.candidate_thresholds(vectors)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1)
    assert 10 <= len(candidates) <= 50 and np.all(np.diff(candidates) > 0)
    assert candidates.min() >= np.sort(sims, axis=1)[:, -10].min() - 1e-6 and candidates.max() <= sims.max() + 1e-6
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        clustering.candidate_thresholds(vectors[:1])


def test_candidate_thresholds_keep_three_significant_digits_of_their_distance():
    np.testing.assert_allclose(clustering.rounded_thresholds(np.array([0.89223, 0.99912, 0.5, 1.0000001, -0.30004])),
                               [0.892, 0.99912, 0.5, 1.0, -0.3], atol=1e-12)
    vectors = clustered_vectors()
    candidates = clustering.candidate_thresholds(vectors)
    distance = 1 - candidates
    significant = distance / 10.0 ** (np.floor(np.log10(distance)) - 2)  # 3 digits before the point
    np.testing.assert_allclose(significant, np.round(significant), atol=1e-6)
    # Embeddings that differ in their last bits, as between CPUs, give the same candidates here.
    moved = vectors + np.random.default_rng(1).normal(scale=1e-7, size=vectors.shape).astype(np.float32)
    assert np.array_equal(clustering.candidate_thresholds(moved), candidates)


def test_a_group_too_large_for_memory_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(clustering.os, "sysconf", lambda name: 256)  # a machine of 64 kB
    with pytest.raises(ValueError, match="group of 150 images .* higher threshold"):
        clustering.IdentityLinkage(clustered_vectors(), -1.0)
