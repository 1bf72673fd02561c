"""Several processes give a single process's results: evaluate.py and search.py under torchrun.

Runs go through `python -m torch.distributed.run` on the CPU (gloo), the launcher `accelerate
launch` itself uses for several processes (`accelerate launch --cpu` starts one process: accelerate
leaves multi-process CPU runs to MPI). `evaluate.py nearid`, `search.py index` and `evaluate.py
retrieval` run in one launch (conftest.py's `two_process_launch` of tests/commands_worker.py: one start
for them and test_train_multiprocess.py's two-process `train.py` run before them, each reading and writing
folders of its own), followed in the same processes by an `evaluate.py nearid` run that a corrupt image
stops. The launch is judged by the runs each process records as returned, by the files they write, by the
message each process stops with, and by its exit code: status 1 from that last run, or the known abort at
exit (CPU process groups are sometimes killed by a signal at exit after all the work is done, see
`helpers.assert_finished`).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from nearid.search import SearchIndex
from tests import commands_worker
from tests.helpers import assert_finished, single_threaded

RESULTS = "nearid_results.json"
TABLE_HEADER = "| source | SSR | PA |"


def store_index(cache_dir):
    """The one store folder under `cache_dir`: its index (shards and keys) and its shard files."""
    [folder] = [p for p in Path(cache_dir).iterdir() if p.is_dir()]
    return json.loads((folder / "index.json").read_text()), sorted(folder.glob("shard-*.npy"))


@pytest.fixture(scope="module")
def runs(commands_data, two_process_launch, tmp_path_factory):
    """The outputs of tests/commands_worker.py's evaluate and search runs on 1 process (this one, without the
    run that stops) and on 2 (conftest.py's `two_process_launch`): {processes: output folder}, and under
    "output" and "code" the launcher's output and exit code."""
    one = tmp_path_factory.mktemp("multiprocess") / "out1"
    with single_threaded():  # this process as the 1-process run, with the launched processes' arithmetic
        commands_worker.run(("nearid", "index", "retrieval"), *commands_data["worker_args"], one)
    return {1: one, 2: two_process_launch["out"], "output": two_process_launch["output"],
            "code": two_process_launch["code"]}


# --- evaluate.py nearid ----------------------------------------------------------------------------


def test_two_processes_write_the_results_of_one(commands_data, runs):
    one, two = runs[1] / "nearid", runs[2] / "nearid"
    broken_row = commands_data["broken_row"]
    first, second = (json.loads((o / RESULTS).read_text()) for o in (one, two))
    assert second["metrics"] == first["metrics"]  # bit-identical, not merely close
    assert second["counts"] == first["counts"]
    assert second["skipped"] == first["skipped"]
    assert [s["image"] for s in second["skipped"]] == [f"source sdxl row {broken_row} column nimg1"]
    for name in ("nearid_per_sample.csv", "nearid_table.md"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name

    # Each image was embedded once in all, each process embedding its share into the one store.
    stats, stats_one = second["provenance"]["extra"]["embedding"], first["provenance"]["extra"]["embedding"]
    assert stats == stats_one
    assert stats["images_embedded"] == stats["unique_images"] - 1  # all but the corrupt one
    assert runs["output"].count(TABLE_HEADER) == 1  # only the main process reports
    index, shards = store_index(runs[2] / "nearid_cache")
    keys = [key for shard in index["shards"] for key in shard["keys"]]
    assert len(set(keys)) == len(keys) == stats["images_embedded"]
    assert {path.name.split("-")[1] for path in shards} == {"p000", "p001"}
    one_index, _ = store_index(runs[1] / "nearid_cache")
    assert sorted(keys) == sorted(k for shard in one_index["shards"] for k in shard["keys"])


def test_corrupt_image_stops_every_process_with_its_location(runs, commands_data):
    """The launch's last run, `evaluate.py nearid` without --skip-bad-images on the copy with a corrupt image."""
    output = runs["output"]
    assert runs["code"] != 0 and "ImageLoadError" not in output  # torchrun reports the exit; ours print no trace
    assert output.count(commands_data["stop_message"]) == 2, output[-4000:]  # each process stops, with the same message
    assert not (runs[2] / "stopped" / RESULTS).exists()


# --- search.py index, evaluate.py retrieval --------------------------------------------------------


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
        with pytest.raises(AssertionError, match="or the known exit-time abort"):
            assert_finished(1, output, complete=True)
    with pytest.raises(AssertionError, match="results are missing"):
        assert_finished(0, "", complete=False)


@pytest.mark.parametrize("first, other, tolerated", [(1, -15, True), (1, 1, True), (-6, 1, True), (2, -15, False),
                                                     (1, 2, False)])
def test_a_run_stopped_on_purpose_is_tolerated_only_with_its_status(first, other, tolerated):
    """commands_worker's last run stops each process with exit status 1; torchrun may stop the other one."""
    output = TORCHRUN_FAILURE.format(first=first, other=other)
    if tolerated:
        assert_finished(1, output, complete=True, exit_status=1)
    else:
        with pytest.raises(AssertionError, match="not status 1"):
            assert_finished(1, output, complete=True, exit_status=1)
    with pytest.raises(AssertionError, match="not status 1"):  # a launch that exits 0 did not stop
        assert_finished(0, "", complete=True, exit_status=1)
