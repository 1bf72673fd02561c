"""Shared bits of the benchmark scripts: the environment header, timing, and recording the output.

torch and transformers are imported where they are used, so a benchmark that needs neither
(bench_search.py: faiss and numpy) runs without them."""

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"
# The random SigLIP of the smoke runs that train or embed: a few milliseconds a forward on one CPU thread.
SMOKE_VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)


def benchmark_parser(doc: str, results_file: str, smoke: str) -> argparse.ArgumentParser:
    """A benchmark's command line: `doc` as its help, --output (default: `results_file` in results/) and --smoke
    (`smoke` says what a smoke run does); the script adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / results_file, help="where the output is recorded")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    return parser


def parse_benchmark_args(parser, argv, smoke: dict) -> argparse.Namespace:
    """The parsed arguments; a smoke run takes the `smoke` values (tiny sizes) and records nothing."""
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(smoke, output=None)
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment_lines() -> list:
    import torch
    import transformers

    return [
        f"date: {datetime.date.today().isoformat()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
    ]


def synchronize() -> None:
    """Wait for the GPU work queued so far, so that a timing counts it. Benchmarks that never import torch
    (bench_search.py, bench_cli_startup.py) have none."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple:
    """(result, seconds) of one call of `fn`, the GPU work it queued included."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def best_time(fn, repeats: int, warm_up: bool = True) -> float:
    """Seconds of the fastest of `repeats` timed calls of `fn`: the least disturbed by other work on a shared
    machine. One untimed call first (allocator, kernels, caches, first-call imports) unless `warm_up` is False."""
    if warm_up:
        fn()
    return min(timed(fn)[1] for _ in range(repeats))


def first_batch_timed(loader) -> tuple:
    """(images after the first batch, seconds from the first batch to the last): the workers' start and
    end (once per pass over the loader, not per batch) are not counted."""
    images, start = 0, None
    for batch in loader:
        last = time.perf_counter()
        if start is None:
            start = last
            continue
        images += len(batch)
    return images, last - start


def write_results(path, lines):
    """Print the lines and record them (unless `path` is None), so the repo keeps the latest output."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
