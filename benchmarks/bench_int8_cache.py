"""What an int8 token cache does to the trained head: the same training run on float16 and on int8 tokens.

int8 halves the cache (0.84 instead of 1.68 MB per so400m image: ~250 instead of ~500 GB for the
paper's run) and the bytes every step reads. This script trains the head twice on the synthetic
benchmark (the demo's data and small random SigLIP base), identical but for --cache-dtype, and
prints the final held-out SSR/PA of both, the final losses, and the relative difference of the first
step's loss (the same weights on both tokens: the quantisation alone; later steps drift apart as any
two runs whose numbers differ do).

Usage: python benchmarks/bench_int8_cache.py [--identities 200] [--epochs 20] [--seeds 0 1 2] [--smoke]
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import benchmark_parser, environment_lines, parse_benchmark_args, write_results  # noqa: E402
from input_common import write_json  # noqa: E402

from nearid.commands import train  # noqa: E402
from nearid.commands.demo import SMALL_SIGLIP, SOURCES  # noqa: E402
from nearid.commands import synthetic  # noqa: E402
from nearid.models import save_siglip_checkpoint  # noqa: E402

DTYPES = ("float16", "int8")


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "int8_cache.txt", "a few steps on little data, nothing recorded")
    parser.add_argument("--identities", type=int, default=200, help="synthetic identities (the demo's 200)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (the demo's 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (data draws)")
    parser.add_argument("--mtg-train", type=int, default=40, help="MTG train rows (the demo's 40)")
    parser.add_argument("--mtg-test", type=int, default=20, help="MTG test rows (the demo's 20)")
    # the synthetic benchmark's DreamBench++ folder, which training does not read: the smoke run writes a minimal one
    parser.set_defaults(dreambench=[])
    return parse_benchmark_args(parser, argv, {"identities": 12, "epochs": 1, "seeds": [0], "mtg_train": 4,
                                               "mtg_test": 2, "dreambench": ["--dreambench-subjects", "1",
                                                                             "--dreambench-prompts", "1"]})


def train_once(data: Path, base: Path, out: Path, dtype: str, seed: int, epochs: int) -> dict:
    """The demo's training run with `--cache-dtype dtype`; returns (final test scores, logged losses)."""
    argv = ["--positives", str(data / "positives"), "--source", *(f"{n}={data / n}" for n in SOURCES),
            "--mtg", str(data / "mtg"), "--train-split", str(data / "splits" / "train.json"),
            "--test-split", str(data / "splits" / "test.json"), "--base-model", str(base), "--output-dir", str(out),
            "--num-epochs", str(epochs), "--per-device-batch-size", "8", "--learning-rate", "3e-3",
            "--warmup-steps", "20", "--log-steps", "1", "--no-export", "--seed", str(seed), "--cache-dtype", dtype]
    with open(f"{out}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        results = train.main(argv)
    losses = [json.loads(line)["loss"] for line in (out / "logs.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"ssr": results["final"]["pooled"]["ssr"], "pa": results["final"]["pooled"]["pa"], "losses": losses}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as folder:
        data, base = Path(folder) / "data", save_siglip_checkpoint(Path(folder) / "base", SMALL_SIGLIP)
        with contextlib.redirect_stdout(sys.stderr):
            synthetic.main(["--output-dir", str(data), "--num-identities", str(args.identities), "--image-size",
                            "64", "--sources", *SOURCES, "--mtg-train", str(args.mtg_train), "--mtg-test",
                            str(args.mtg_test), *args.dreambench])
        for seed in args.seeds:
            for dtype in DTYPES:
                runs[seed, dtype] = train_once(data, base, Path(folder) / f"{dtype}-{seed}", dtype, seed, args.epochs)
    lines = [f"data: the demo's synthetic benchmark ({args.identities} identities, sources {', '.join(SOURCES)}, "
             f"MTG {args.mtg_train} train rows), small random SigLIP {SMALL_SIGLIP}; {args.epochs} epochs, batch 8; final scores on the test split",
             "", f"{'seed':>4}{'SSR fp16':>10}{'SSR int8':>10}{'PA fp16':>10}{'PA int8':>10}{'final loss fp16':>17}"
             f"{'int8':>9}{'step-1 loss diff':>18}"]
    for seed in args.seeds:
        a, b = runs[seed, "float16"], runs[seed, "int8"]
        first = abs(a["losses"][0] - b["losses"][0]) / abs(a["losses"][0])  # quantisation alone, same weights
        lines.append(f"{seed:>4}{a['ssr']:>10.2f}{b['ssr']:>10.2f}{a['pa']:>10.2f}{b['pa']:>10.2f}"
                     f"{a['losses'][-1]:>17.4f}{b['losses'][-1]:>9.4f}{first:>18.1e}")
    mean = {(dtype, metric): sum(runs[seed, dtype][metric] for seed in args.seeds) / len(args.seeds)
            for dtype in DTYPES for metric in ("ssr", "pa")}
    lines.append(f"mean over seeds: SSR {mean['float16', 'ssr']:.2f} (fp16) vs {mean['int8', 'ssr']:.2f} (int8), "
                 f"PA {mean['float16', 'pa']:.2f} vs {mean['int8', 'pa']:.2f}")
    write_results(args.output, environment_lines() + lines)
    write_json(args.output and args.output.with_suffix(".json"),
               {f"{dtype}_{metric}": value for (dtype, metric), value in mean.items()})


if __name__ == "__main__":
    main()
