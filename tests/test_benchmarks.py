"""The benchmark scripts and the GPU check run end to end in their smoke modes, as users run them."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

SMOKES = ["bench_train_compute.py", "bench_token_loader.py", "bench_embedding_pipeline.py", "bench_int8_cache.py"]
GPU_FIGURES = {
    "forward_eager_images_per_s", "forward_compiled_images_per_s", "compiled_max_abs_difference",
    "forward_only_images_per_s", "end_to_end_images_per_s", "cache_build_float16_images_per_s",
    "cache_build_int8_images_per_s", "sequential_warm_gb_per_s", "sequential_cold_gb_per_s", "loader_warm_gb_per_s",
    "loader_cold_gb_per_s", "head_loader_steps_per_s", "head_resident_steps_per_s", "head_overlap",
}


def run_script(name, *args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / name), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("name", SMOKES)
def test_benchmark_smoke_modes_run(name, tmp_path):
    before = {path: path.stat().st_mtime_ns for path in (REPO_ROOT / "benchmarks" / "results").iterdir()}
    assert run_script(name, "--smoke", tmp_path=tmp_path).strip()
    after = {path: path.stat().st_mtime_ns for path in (REPO_ROOT / "benchmarks" / "results").iterdir()}
    assert after == before  # a smoke run records nothing


def test_gpu_check_smoke_records_every_figure_in_one_file(tmp_path):
    output = tmp_path / "gpu_check.json"
    report = run_script("gpu_check.py", "--smoke", "--output", str(output), tmp_path=tmp_path)
    recorded = json.loads(output.read_text())
    figures = recorded["figures"]
    assert not [key for key in figures if key.endswith("_error")]
    assert GPU_FIGURES <= set(figures) and all(math.isfinite(value) and value >= 0 for value in figures.values())
    assert figures["compiled_max_abs_difference"] < 1e-4  # the compiled forward computes the same embedding
    assert recorded["environment"]["device"] == "cpu" and recorded["report"] == report.strip().splitlines()


def test_the_estimate_reads_the_recorded_figures(tmp_path):
    report = run_script("estimate_real_run.py", "--output", str(tmp_path / "estimate.txt"), tmp_path=tmp_path)
    assert "vs 6.5 h" in report and (tmp_path / "estimate.txt").read_text() == report
