"""Several processes give a single process's results: evaluate.py under torchrun.

Runs go through `python -m torch.distributed.run` on the CPU (gloo), the launcher `accelerate
launch` itself uses for several processes (`accelerate launch --cpu` starts one process: accelerate
leaves multi-process CPU runs to MPI). Each run is judged by the files its processes write, and by
its exit code: 0, or the known abort at exit (CPU process groups are sometimes killed by a signal at exit
after all the work is done, see `helpers.assert_finished`).
"""

import json
from pathlib import Path

import datasets
import pytest

from nearid.commands import evaluate
from nearid.data import readers
from tests.helpers import REPO_ROOT, assert_finished, launch, single_threaded

RESULTS = "nearid_results.json"
TABLE_HEADER = "| source | SSR | PA |"


def store_index(cache_dir):
    """The one store folder under `cache_dir`: its index (shards and keys) and its shard files."""
    [folder] = [p for p in Path(cache_dir).iterdir() if p.is_dir()]
    return json.loads((folder / "index.json").read_text()), sorted(folder.glob("shard-*.npy"))


# --- evaluate.py nearid ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark(synthetic, tiny_repo, tmp_path_factory):
    """conftest.py's synthetic positives and two sources, a copy of `sdxl` with one image corrupt, and its
    tiny model: {"positives", "flux", "sdxl_broken", "model", "broken_row"}."""
    root = tmp_path_factory.mktemp("benchmark")
    sdxl = readers.undecoded(datasets.load_from_disk(str(synthetic / "sdxl")), ["nimg1"])
    present = [r for r, ref in enumerate(readers.image_refs(sdxl, "nimg1", range(len(sdxl)))) if ref]
    broken_row = present[len(present) // 2]
    garbage = {"bytes": b"not an image", "path": None}
    sdxl = sdxl.map(lambda e, i: {"nimg1": garbage if i == broken_row else e["nimg1"]}, with_indices=True)
    sdxl.cast_column("nimg1", datasets.Image()).save_to_disk(str(root / "sdxl_broken"))
    return {"positives": synthetic / "positives", "flux": synthetic / "flux", "sdxl_broken": root / "sdxl_broken",
            "model": tiny_repo, "broken_row": broken_row}


def evaluate_args(benchmark, out, cache, *extra):
    return ["nearid", "--model", benchmark["model"], "--positives", benchmark["positives"], "--source",
            f"flux={benchmark['flux']}", "--source", f"sdxl={benchmark['sdxl_broken']}", "--device", "cpu",
            "--batch-size", "4", "--output-dir", out, "--cache-dir", cache, *extra]


def launch_evaluate(num_processes, benchmark, tmp_path, out, cache, *extra):
    args = [REPO_ROOT / "evaluate.py", *evaluate_args(benchmark, out, cache, *extra)]
    launched = launch(num_processes, args, tmp_path, f"{out.name}.log")
    # No remote-code module cache to fill first: the tools build the model with this checkout's classes.
    assert not list((tmp_path / "hf_modules").rglob("*.py"))
    return launched


def test_two_processes_write_the_results_of_one(benchmark, tmp_path):
    one, one_cache = tmp_path / "out1", tmp_path / "cache1"
    with single_threaded():  # this process as a 1-process run, with the launched processes' arithmetic
        evaluate.main([str(arg) for arg in evaluate_args(benchmark, one, one_cache, "--skip-bad-images")])
    two, two_cache = tmp_path / "out2", tmp_path / "cache2"
    code, two_output = launch_evaluate(2, benchmark, tmp_path, two, two_cache, "--skip-bad-images")
    assert_finished(code, two_output, (two / RESULTS).is_file())
    broken_row = benchmark["broken_row"]
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
    assert two_output.count(TABLE_HEADER) == 1  # only the main process reports
    index, shards = store_index(two_cache)
    keys = [key for shard in index["shards"] for key in shard["keys"]]
    assert len(set(keys)) == len(keys) == stats["images_embedded"]
    assert {path.name.split("-")[1] for path in shards} == {"p000", "p001"}
    assert sorted(keys) == sorted(k for shard in store_index(one_cache)[0]["shards"] for k in shard["keys"])


def test_corrupt_image_stops_every_process_with_its_location(benchmark, tmp_path):
    out, broken_row = tmp_path / "out", benchmark["broken_row"]
    code, output = launch_evaluate(2, benchmark, tmp_path, out, tmp_path / "cache")  # no --skip-bad-images
    assert code != 0 and "ImageLoadError" not in output  # torchrun reports the exit; our processes print no trace
    message = f"error: Could not decode source sdxl row {broken_row} column nimg1"
    assert output.count(message) == 2, output[-4000:]  # each process stops, with the same message
    assert not (out / RESULTS).exists()
