"""A smoke run of the search benchmark (the measured numbers live in benchmarks/results/search.txt)."""

import importlib.util

from tests.helpers import REPO_ROOT


def test_the_search_benchmark_runs_and_records_its_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when run as a script: bench_common beside it
    spec = importlib.util.spec_from_file_location("bench_search", REPO_ROOT / "benchmarks" / "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = bench.main(["--n", "3000", "--dim", "32", "--queries", "50", "--categories", "5", "--kinds", "ivf", "hnsw",
                        "--output", str(tmp_path / "search.txt")])
    assert (tmp_path / "search.txt").read_text().splitlines() == lines
    rows = [line for line in lines if line.startswith("| faiss ")]
    assert len(rows) == 1 + 6 + 5 and any(line.startswith("| numpy brute force") for line in lines)
    assert all(0.0 <= float(row.split("|")[5]) <= 1.0 for row in rows)  # recall@10
    assert lines[-1].startswith(("Fastest at recall@10 >= 0.99", "No approximate setting"))
