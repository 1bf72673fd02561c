"""Several processes give the results of one: `search.py index` and `evaluate.py retrieval` under torchrun.

Runs are judged by the files they write, and by their exit code: 0, or the known abort at exit (CPU process
groups are sometimes killed by a signal at exit after all the work is done, see `helpers.assert_finished`).
"""

import json

import numpy as np
import pytest

from nearid.hub import export_hub_folder
from nearid.search import SearchIndex
from tests import search_worker
from tests.helpers import (
    REPO_ROOT,
    assert_finished,
    draw_vector,
    launch,
    make_tiny_nearid,
    make_tiny_processor,
    single_threaded,
)


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """The outputs of the worker on 1 and 2 processes: {processes: output folder}."""
    root = tmp_path_factory.mktemp("multiprocess")
    model = export_hub_folder(make_tiny_nearid(), make_tiny_processor(), root / "model")
    gallery = root / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for number in range(11):
        draw_vector(rng.uniform(-1, 1, 3 * 8 * 8), side=8).save(gallery / f"image{number:02d}.png")
    with single_threaded():  # this process as the 1-process run, with the launched processes' arithmetic
        search_worker.main(str(model), str(gallery), str(synthetic), str(root / "out1"))
    out = root / "out2"
    code, output = launch(2, [REPO_ROOT / "tests" / "search_worker.py", model, gallery, synthetic, out], root,
                          "out2.log")
    assert_finished(code, output, (out / "retrieval" / "retrieval_results.json").is_file()
                    and (out / "index" / "search_index.json").is_file())
    # No remote-code module cache to fill first: the tools build the model with this checkout's classes.
    assert not list((root / "hf_modules").rglob("*.py"))
    return {1: root / "out1", 2: out}


def test_two_processes_build_the_index_of_one(runs):
    one, two = (SearchIndex.load(runs[n] / "index") for n in (1, 2))
    assert len(one) == 11 and one.entries() == two.entries()
    np.testing.assert_array_equal(one.vectors(), two.vectors())
    assert (runs[1] / "index" / "faiss.index").read_bytes() == (runs[2] / "index" / "faiss.index").read_bytes()
    info = [json.loads((runs[n] / "index" / "search_index.json").read_text()) for n in (1, 2)]
    for one_info in info:  # the provenance differs (process count), and with it the file's own checksum
        one_info.pop("provenance")
        one_info["checksums"].pop("info")
    assert info[0] == info[1]
    shards = {path.name.split("-")[1] for path in (runs[2] / "cache").rglob("shard-*.npy")}
    assert shards == {"p000", "p001"}  # both processes embedded a share


def test_two_processes_give_the_retrieval_results_of_one(runs):
    one, two = (runs[n] / "retrieval" for n in (1, 2))
    first, second = (json.loads((folder / "retrieval_results.json").read_text()) for folder in (one, two))
    assert second["metrics"] == first["metrics"] and first["metrics"]["n_queries"] > 0
    for name in ("retrieval_per_query.csv", "retrieval_table.md"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


TORCHRUN_FAILURE = """Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : {other} (pid: 4243)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {first} (pid: 4242)
============================================================
"""


@pytest.mark.parametrize("first, other, tolerated", [(-6, -6, True), (-11, -6, True), (1, -15, False),
                                                     (-6, 1, False)])
def test_only_a_signal_at_exit_after_complete_results_is_tolerated(first, other, tolerated):
    output = TORCHRUN_FAILURE.format(first=first, other=other)
    if tolerated:
        assert_finished(1, output, complete=True)
    else:
        with pytest.raises(AssertionError, match="not the known exit-time abort"):
            assert_finished(1, output, complete=True)
    with pytest.raises(AssertionError, match="results are missing"):
        assert_finished(0, "", complete=False)
