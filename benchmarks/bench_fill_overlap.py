"""The store's fill overlaps its shard writes with the forward: a token pass takes max(encode, write), not the sum.

A fake encoder of fixed cost per batch (it sleeps, as a GPU forward leaves the CPU free) fills a
store with so400m-sized token rows (729 x 1152, float16 and int8), through nearid.store.fill.fill as
train.py's token pass runs it. Prints, from one run on this machine, the median round of `--rounds`
by fill / max (each round times the three one after the other, so that a change of this shared
machine's load between them weighs little; a median, as one busy moment can slow either side):

  - write: the same fill with an encoder of no cost (conversion, checks, shard writes, fsync);
  - encode: the fake encoder alone on the same batches, its cost set to the write time per batch
    (encode = write is where overlapping matters most: the sum is twice the max);
  - fill: both together, and fill / max(encode, write) (goal <= 1.1) and fill / (encode + write)
    (0.5 is a perfect overlap here, 1 none).

What cannot overlap is the write of the last batch, after the last forward (the writer puts each
batch's rows into the open shard as they come): 1/batches of the writes. The default run writes 60
batches into 12 shards of 160 rows (269 MB in float16: like train.py's 1024-row shards, above the
size the store checks whole when it indexes them); a real token pass writes ~290 shards.

Usage: python benchmarks/bench_fill_overlap.py [--images 256] [--smoke]
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import benchmark_parser, environment_lines, parse_benchmark_args, timed, write_results  # noqa: E402
from input_common import Precomputed, image_number, write_json  # noqa: E402

from nearid.store.fill import FillOptions, fill  # noqa: E402
from nearid.store.format import StoreFormat  # noqa: E402

SHAPE, BATCH, GOAL = (729, 1152), 32, 1.1


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "fill_overlap.txt", "tiny sizes, nothing recorded")
    parser.add_argument("--images", type=int, default=1920, help="token rows per fill (1.68 MB each in float16)")
    parser.add_argument("--shard-size", type=int, default=160, help="rows per shard")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of write, encode, fill (the median kept)")
    parser.set_defaults(shape=SHAPE)
    return parse_benchmark_args(parser, argv, {"images": 2 * BATCH, "shard_size": BATCH, "rounds": 1,
                                               "shape": (16, 32)})


def fill_seconds(folder: Path, dtype: str, encoder, args) -> float:
    """Seconds of one fill of `args.images` rows into a fresh store."""
    items = {f"image-{i:07d}": i for i in range(args.images)}
    target = folder / f"{dtype}-{time.perf_counter_ns()}"
    _, seconds = timed(lambda: fill(target, "overlap", StoreFormat(args.shape, dtype), items, image_number, encoder,
                                    FillOptions(batch_size=BATCH, shard_size=args.shard_size, progress=False)))
    shutil.rmtree(target)
    return seconds


def encode_seconds(encoder, batches: int) -> float:
    return timed(lambda: [encoder.encode(range(BATCH)) for _ in range(batches)])[1]


def measure_round(folder: Path, dtype: str, args) -> dict:
    """write, then the fake encoder at the write's time per batch alone, then both: one after the other."""
    batches = -(-args.images // BATCH)
    write = fill_seconds(folder, dtype, Precomputed(args.shape, BATCH), args)
    encoder = Precomputed(args.shape, BATCH, seconds=write / batches)
    encode = encode_seconds(encoder, batches)
    fill_time = fill_seconds(folder, dtype, encoder, args)
    return {"write_s": write, "encode_s": encode, "fill_s": fill_time, "fill_over_max": fill_time / max(encode, write),
            "fill_over_sum": fill_time / (encode + write)}


def measure(folder: Path, dtype: str, args) -> dict:
    rounds = [measure_round(folder, dtype, args) for _ in range(args.rounds)]
    median = sorted(rounds, key=lambda result: result["fill_over_max"])[(len(rounds) - 1) // 2]
    return {**median, "rounds_fill_over_max": [result["fill_over_max"] for result in rounds]}


def main(argv=None):
    args = parse_args(argv)
    load_before, figures = os.getloadavg()[0], {}
    shards = -(-args.images // args.shard_size)
    batches = -(-args.images // BATCH)
    lines = [f"fill of {args.images} token rows of {args.shape[0]} x {args.shape[1]} in batches of {BATCH}, {shards} "
             f"shards of {args.shard_size}, the median of {args.rounds} rounds (seconds):",
             f"{'storage':<9}{'write':>8}{'encode':>8}{'fill':>8}{'fill / max':>12}{'fill / sum':>12}{'<= 1.1':>8}"]
    with tempfile.TemporaryDirectory(prefix="bench-fill-overlap-") as folder:
        for dtype in ("float16", "int8"):
            figures[dtype] = result = measure(Path(folder), dtype, args)
            lines.append(f"{dtype:<9}{result['write_s']:>8.2f}{result['encode_s']:>8.2f}{result['fill_s']:>8.2f}"
                         f"{result['fill_over_max']:>12.2f}{result['fill_over_sum']:>12.2f}"
                         f"{'yes' if result['fill_over_max'] <= GOAL else 'NO':>8}")
    figures["fill_over_max"] = max(figures[dtype]["fill_over_max"] for dtype in ("float16", "int8"))
    lines += ["write = the fill with an encoder of no cost; encode = the fake encoder alone (sleeps write / batches "
              "per batch, as a GPU forward leaves the CPU free); fill = both: max(encode, write) if the writes are "
              "overlapped, encode + write if not; the last batch's write follows the last forward, so a perfect "
              f"overlap gives about 1 + 1/{batches} = {1 + 1 / batches:.2f} here",
              "fill / max of every round: " + ", ".join(
                  f"{dtype} " + " ".join(f"{ratio:.2f}" for ratio in figures[dtype]["rounds_fill_over_max"])
                  for dtype in ("float16", "int8")),
              f"load average (1 min) of this shared machine: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
              f"({os.cpu_count()} CPUs)"]
    write_results(args.output, environment_lines() + lines)
    write_json(args.output and args.output.with_suffix(".json"), figures)


if __name__ == "__main__":
    main()
