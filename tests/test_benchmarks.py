"""Every benchmark script and the GPU check run end to end in their smoke modes, as users run them.

All smoke runs share one fresh interpreter (`smoke`): each script runs as `__main__` with its own
arguments, in its own working folder, its output, any error and the training steps it took (calls of
the trainer's `train_step`) kept apart. One interpreter instead of one per script saves the import of
torch and transformers, seconds each.
"""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.helpers import REPO_ROOT

GPU_FIGURES = {
    "forward_eager_images_per_s", "forward_compiled_images_per_s", "compiled_max_abs_difference",
    "forward_only_images_per_s", "end_to_end_images_per_s", "cache_build_float16_images_per_s",
    "cache_build_int8_images_per_s", "sequential_warm_gb_per_s", "sequential_cold_gb_per_s", "loader_warm_gb_per_s",
    "loader_cold_gb_per_s", "head_loader_steps_per_s", "head_resident_steps_per_s", "head_overlap",
}
RUNNER = """
import contextlib, gc, io, json, os, runpy, sys, traceback
from nearid.cli import collector_paused, freeze_heavy_imports
freeze_heavy_imports()  # this interpreter is the scripts' program, as a command's is (nearid.cli)
with collector_paused(freeze=True):  # torch and transformers
    from nearid.training import loop
scripts, out, folder_of_scripts = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
results, trainer_step, steps = {}, loop.train_step, []

def counted_step(*args, **kwargs):  # the trainer's step, counted: set before any script imports it
    steps.append(1)
    return trainer_step(*args, **kwargs)

loop.train_step = counted_step
for name, args in scripts.items():
    # Frozen, what is already here (the imports above all) is not walked again by each collection a script
    # asks for (input_common ends the loader's workers with one): half a second each on this heap.
    gc.freeze()
    stdout, error = io.StringIO(), None
    steps.clear()
    folder = os.path.join(out, name.removesuffix(".py"))
    os.makedirs(folder)
    os.chdir(folder)
    sys.argv = [name, *args]
    try:
        with contextlib.redirect_stdout(stdout):
            runpy.run_path(os.path.join(folder_of_scripts, name), run_name="__main__")
    except SystemExit as exit_:
        error = None if exit_.code in (0, None) else f"exit status {exit_.code}"
    except BaseException:
        error = traceback.format_exc()
    results[name] = {"stdout": stdout.getvalue(), "error": error, "train_steps": len(steps)}
with open(os.path.join(out, "results.json"), "w") as stream:
    json.dump(results, stream)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """{script: (stdout, its working folder)} of every benchmark's smoke run, in one interpreter."""
    out = tmp_path_factory.mktemp("smoke")
    scripts = {
        "bench_image_processor.py": ["--smoke"],
        "bench_train_compute.py": ["--smoke"],
        "bench_token_loader.py": ["--smoke"],
        "bench_embedding_pipeline.py": ["--smoke"],
        "profile_input_path.py": ["--smoke"],
        "bench_fill_overlap.py": ["--smoke"],
        "bench_int8_cache.py": ["--smoke"],
        "bench_checksums.py": ["--smoke"],
        "bench_plots.py": ["--smoke"],
        "gpu_check.py": ["--smoke", "--output", str(out / "gpu_check.json")],
        "estimate_real_run.py": ["--output", str(out / "estimate.txt")],
        "bench_search.py": ["--n", "3000", "--dim", "32", "--queries", "50", "--categories", "5", "--kinds", "ivf",
                            "hnsw", "--output", str(out / "search.txt")],
    }
    before = {path: path.stat().st_mtime_ns for path in (REPO_ROOT / "benchmarks" / "results").iterdir()}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "benchmarks"), str(REPO_ROOT)]))
    subprocess.run([sys.executable, "-c", RUNNER, json.dumps(scripts), str(out), str(REPO_ROOT / "benchmarks")],
                   env=env, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    after = {path: path.stat().st_mtime_ns for path in (REPO_ROOT / "benchmarks" / "results").iterdir()}
    assert after == before  # a smoke run records nothing in the repository
    return results, out


def output_of(smoke, name):
    results, _ = smoke
    assert results[name]["error"] is None, results[name]["error"]
    assert results[name]["stdout"].strip()
    return results[name]["stdout"]


NUMBER = r"(\d+(?:\.\d+)?)"
# What each benchmark measures, as its smoke run prints it: one pattern per figure line, its numbers captured.
FIGURE_LINES = {
    "bench_train_compute.py": [rf"^wall-time ratio reference / cache: {NUMBER}x \(>= 5x: (?:yes|NO)\)$",
                               rf"^backbone-forward ratio: {NUMBER}x \(>= 5x: (?:yes|NO)\)$",
                               rf"^compute ratio \(forwards x backbone FLOPs .*\): {NUMBER}x \(>= 5x: (?:yes|NO)\)$",
                               r"^same training: yes: final loss \S+ \(cache\) vs \S+ \(reference\)"],
    "bench_token_loader.py": [rf"^loader / plain read, warm \(best worker count\): {NUMBER} \(>= 0.8: (?:yes|NO)\)$",
                              rf"^loader / plain read, cold \(best worker count\): {NUMBER} \(>= 0.8: (?:yes|NO)\)$",
                              rf"^loader / plain read into a buffer of one batch, warm \(best worker count\): {NUMBER} ",
                              rf"^  ratio loader / in memory: {NUMBER} \(>= 0.9: (?:yes|NO)\)$"],
    "bench_embedding_pipeline.py": [rf"^  512 px JPEG: {NUMBER} images/s per worker",
                                    rf"^  1024 px JPEG: {NUMBER} images/s per worker",
                                    rf"^small\s+\d+\s+\d+\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$"],
    "bench_int8_cache.py": [rf"^\s+0\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\S+$",
                            rf"^mean over seeds: SSR {NUMBER} \(fp16\) vs {NUMBER} \(int8\), PA {NUMBER} vs {NUMBER}$"],
    # write, encode and fill in separate runs; encode and write inside the fill; fill / max in the fill and
    # against the separate runs; fill / sum; write in the fill / write alone
    "bench_fill_overlap.py": [rf"^{dtype}" + rf"\s+{NUMBER}" * 9 + r"\s+(?:yes|NO)$" for dtype in ("float16", "int8")],
    # a sheet drawn with an Axes per cell and composed: seconds of each and their ratio; then per image, the
    # milliseconds and kilobytes of its PNG at zlib levels 1 to 9
    "bench_plots.py": [rf"^heatmaps\s+{kind}\s+\d+\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x$"
                       for kind in ("drawn", "textured")]
    + [rf"^{image}\s+\d+x\d+" + rf"\s+{NUMBER}/{NUMBER}" * 9 + "$"
       for image in ("heatmaps sheet, drawn", "heatmaps sheet, textured", r"margin histograms \(matplotlib\)")]
    + [rf"^{plot}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x$"
       for plot in ("margins", "training loss", "SSR and PA", "retrieval", "MTG")],
}


@pytest.mark.parametrize("name", sorted(FIGURE_LINES))
def test_benchmark_smoke_modes_print_what_they_measure(smoke, name):
    """Each smoke run prints every figure line of its recorded report, with finite numbers (a score may be 0)."""
    output = output_of(smoke, name)
    for pattern in FIGURE_LINES[name]:
        match = re.search(pattern, output, re.M)
        assert match, f"{name} printed no line matching {pattern!r}:\n{output}"
        assert all(0 <= float(value) < math.inf for value in match.groups() if value), match.group(0)


def test_the_embedding_benchmark_ratio_is_end_to_end_over_forward(smoke):
    output = output_of(smoke, "bench_embedding_pipeline.py")
    forward, end_to_end, ratio = map(float, re.search(FIGURE_LINES["bench_embedding_pipeline.py"][2], output,
                                                      re.M).groups())
    assert ratio == pytest.approx(end_to_end / forward, abs=0.01)


def test_the_input_path_profile_times_every_stage_and_both_hand_overs(smoke):
    output = output_of(smoke, "profile_input_path.py")
    for stage in ("decode", "resize", "normalise", "collate", "hash", "hand-over", "pinning: not measured",
                  "2 workers / 1 worker, uint8", "float16", "int8", "load average"):
        assert stage in output, stage


def test_the_image_processor_benchmark_checks_agreement(smoke):
    output = output_of(smoke, "bench_image_processor.py")
    assert "outputs agree: max |diff| = 0" in output and "speed-up:" in output


def test_gpu_check_smoke_records_every_figure_in_one_file(smoke):
    report = output_of(smoke, "gpu_check.py")
    recorded = json.loads((smoke[1] / "gpu_check.json").read_text())
    figures = recorded["figures"]
    assert not [key for key in figures if key.endswith("_error")]
    assert GPU_FIGURES <= set(figures) and all(math.isfinite(value) and value >= 0 for value in figures.values())
    assert figures["compiled_max_abs_difference"] < 1e-4  # the compiled forward computes the same embedding
    assert recorded["environment"]["device"] == "cpu" and recorded["report"] == report.strip().splitlines()


def test_the_estimate_reads_the_recorded_figures(smoke):
    report = output_of(smoke, "estimate_real_run.py")
    assert "vs 6.5 h" in report and (smoke[1] / "estimate.txt").read_text() == report
    # benchmarks/results/gpu_check.json is recorded, so its own rates make two rows of their own.
    assert "float16 as measured on the " in report and "int8    as measured on the" in report
    inputs = report[report.index("inputs:"):report.index("assumed (the method):")].strip().splitlines()[1:]
    assert inputs and all("[measured: results/" in line or "[assumed" in line for line in inputs), inputs
    rows = [line for line in report.splitlines() if line.startswith(("float16 ", "int8 "))]
    assert rows and all("measured" in row or "assumed" in row for row in rows)
    assert "Not measured: the GPU figures predate" in report


def test_the_checksum_benchmark_prints_the_cost_of_verifying(smoke):
    output = output_of(smoke, "bench_checksums.py")
    assert "largest cost of verifying" in output and "xxh3_128 (xxhash)" in output
    rows = [line.split() for line in output.splitlines() if line.split()[:1] in (["pooled"], ["tokens"])]
    assert [row[0] for row in rows] == ["pooled", "tokens"] and all(row[-1].endswith("%") for row in rows)


def test_the_search_benchmark_runs_and_records_its_table(smoke):
    output_of(smoke, "bench_search.py")
    lines = (smoke[1] / "search.txt").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| faiss ")]
    assert len(rows) == 1 + 6 + 5 and any(line.startswith("| numpy brute force") for line in lines)
    assert all(0.0 <= float(row.split("|")[5]) <= 1.0 for row in rows)  # recall@10
    assert lines[-1].startswith(("Fastest at recall@10 >= 0.99", "No approximate setting"))


def test_the_head_step_benchmarks_time_the_trainers_own_step(smoke, monkeypatch):
    """bench_token_loader.py and gpu_check.py time train.py's `train_step` and optimizer set-up, not a copy:
    their smoke runs called it."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import input_common

    from nearid.training import loop

    assert input_common.train_step is loop.train_step and input_common.steps_only_run is loop.steps_only_run
    results, _ = smoke
    for name in ("bench_token_loader.py", "gpu_check.py"):
        output_of(smoke, name)
        assert results[name]["train_steps"] > 0, f"{name} took no step of the trainer's train_step"


def test_best_time_keeps_the_fastest_timed_call_after_an_untimed_warm_up(monkeypatch):
    """The one timing helper of every benchmark: a warm-up call unless told not to, then the fastest repeat."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench_common

    def clock(readings):
        readings = iter(readings)
        monkeypatch.setattr(bench_common, "time", SimpleNamespace(perf_counter=lambda: next(readings)))

    calls = []
    clock([0, 5, 10, 12, 20, 27])  # the timed calls take 5, 2 and 7 s
    assert bench_common.best_time(lambda: calls.append("call"), 3) == 2 and len(calls) == 4
    calls.clear()
    clock([0, 5, 10, 12, 20, 27])
    assert bench_common.best_time(lambda: calls.append("call"), 3, warm_up=False) == 2 and len(calls) == 3
    clock([1.0, 2.5])
    assert bench_common.timed(lambda: "result") == ("result", 1.5)


def test_the_fill_overlap_benchmark_times_the_writes_inside_the_fill(monkeypatch, tmp_path):
    """The goal's write time is the writer's own, inside the fill: every shard written counted once (a flush
    inside an add is not counted twice), and the writer's methods are its own again afterwards."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench_fill_overlap
    from input_common import Precomputed, image_number

    from nearid.store.fill import FillOptions, fill
    from nearid.store.format import StoreFormat
    from nearid.store.writer import ShardWriter

    # A clock of the benchmark's own that only the writes (0.2 s each) and the encoder's calls (0.01 s) move,
    # so the sums below do not depend on the machine's load.
    clock, sleeps = [0.0], []

    def tick(seconds):
        clock[0] += seconds

    monkeypatch.setattr(bench_fill_overlap, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(ShardWriter, "flush", lambda writer, flush=ShardWriter.flush: (
        sleeps.append(0.2), tick(0.2), flush(writer))[-1])
    originals = (ShardWriter.add, ShardWriter.flush)
    precomputed = Precomputed((2, 4), 4)
    encoder = bench_fill_overlap.Clocked(SimpleNamespace(encode=lambda numbers: (tick(0.01),
                                                                               precomputed.encode(numbers))[-1]))
    with bench_fill_overlap.writes_clocked() as writes:
        fill(tmp_path, "f", StoreFormat((2, 4), "float16"), {f"k{i}": i for i in range(8)}, image_number, encoder,
             FillOptions(batch_size=4, shard_size=4, progress=False))
    assert (ShardWriter.add, ShardWriter.flush) == originals
    assert len(sleeps) == 3  # each of the 2 full shards flushed inside an add, then close's flush
    # 0.6 s of writes, plus at most the encoder's 0.02 s if a call ran beside one; 1.0 s if the flushes inside
    # add were counted twice.
    assert sum(sleeps) <= writes[0] <= sum(sleeps) + 0.02 + 1e-9
    assert 0.02 - 1e-9 <= encoder.seconds <= 0.02 + sum(sleeps) + 1e-9  # two calls, and any write beside them
