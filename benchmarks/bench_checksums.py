"""What verifying checksums costs a warm run (`nearid.integrity`, `nearid.store.layout`).

Every fill of the embed-once store verifies each shard's XXH3-128 checksum before trusting it. This
script builds two stores once, then times the warm pass a later run makes, with and without that
verification (it is switched off by replacing `nearid.store.layout.verify_shard` with a no-op), and prints
the ratio. Both passes are the store's part alone (the fill that finds nothing to compute, then
reading every stored value once), so the ratio is the largest share verification can take: a real
warm run also loads the model and hashes every image file, and training reads the tokens every
epoch and trains the head on them.

- pooled: an evaluation or search store, so400m's 1152 float32 values per image;
- tokens: a training store, so400m's 729 x 1152 float16 tokens per image (1.68 MB).

It also prints the throughput of the candidate hashes on one core (why XXH3: the cryptographic ones
would cost several times more).

Usage: python benchmarks/bench_checksums.py [--pooled-images 50000] [--token-images 192] [--repeats 5] [--smoke]
"""

import hashlib
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import (  # noqa: E402
    benchmark_parser,
    best_time,
    environment_lines,
    parse_benchmark_args,
    timed,
    write_results,
)
from input_common import RandomTokens, image_number  # noqa: E402

import nearid.store.layout  # noqa: E402
from nearid.store.fill import FillOptions, fill  # noqa: E402
from nearid.store.format import StoreFormat  # noqa: E402

LIMIT = 0.05  # verifying may slow a warm run by at most 5%


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "checksums.txt", "tiny stores, one repeat, nothing recorded")
    parser.add_argument("--pooled-images", type=int, default=50000, help="images in the pooled store")
    parser.add_argument("--token-images", type=int, default=192, help="images in the token store (1.68 MB each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed warm passes of each kind (the best counts)")
    return parse_benchmark_args(parser, argv, {"pooled_images": 500, "token_images": 4, "repeats": 1})


def fill_store(folder, fmt, items):
    """(store, report) of the store's fill of `items` ({key: image number}): random values where it has none
    (what is stored does not matter here)."""
    return fill(folder, "bench", fmt, items, image_number, RandomTokens(fmt.shape),
                FillOptions(batch_size=64, shard_size=1024, progress=False))


def warm_pass(folder, fmt, items, chunk):
    """What a warm run does with its store: a fill that computes nothing, then every value read once."""
    store, report = fill_store(folder, fmt, items)
    assert report.images_computed == 0
    keys = list(items)
    for start in range(0, len(keys), chunk):
        store.get(keys[start:start + chunk])


def verify_all(root):
    for path in sorted(nearid.store.layout.store_folder(root, "bench").glob("shard-*.npy")):
        nearid.store.layout.verify_shard(path)


def compare(folder, fmt, items, chunk, repeats):
    """(seconds with verification, seconds without, seconds of the verification alone): the best of `repeats`
    each, interleaved."""
    fill_store(folder, fmt, items)  # the cold build, not timed
    verify = nearid.store.layout.verify_shard
    with_, without, alone = [], [], []
    warm_pass(folder, fmt, items, chunk)  # the files in the page cache: a warm run
    for _ in range(repeats):
        alone.append(timed(lambda: verify_all(folder))[1])
        with_.append(timed(lambda: warm_pass(folder, fmt, items, chunk))[1])
        nearid.store.layout.verify_shard = lambda path: None
        try:
            without.append(timed(lambda: warm_pass(folder, fmt, items, chunk))[1])
        finally:
            nearid.store.layout.verify_shard = verify
    return min(with_), min(without), min(alone)


def hash_rates(megabytes=256) -> dict:
    """GB/s of each candidate hash over one in-memory buffer, on one core."""
    import xxhash

    data = np.random.default_rng(0).integers(0, 255, megabytes * 2**20, dtype=np.uint8).tobytes()
    hashes = {"xxh3_128 (xxhash)": lambda: xxhash.xxh3_128_hexdigest(data),
              "blake2b (hashlib)": lambda: hashlib.blake2b(data).hexdigest(),
              "sha256 (hashlib)": lambda: hashlib.sha256(data).hexdigest()}
    return {name: len(data) / 1e9 / best_time(fn, 2, warm_up=False) for name, fn in hashes.items()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("nearid").setLevel(logging.ERROR)
    stores = {"pooled": (StoreFormat((1152,), "float32"), args.pooled_images, 4096),
              "tokens": (StoreFormat((729, 1152), "float16"), args.token_images, 16)}
    lines = ["warm store pass (a fill that computes nothing, then every value read once), best of "
             f"{args.repeats}, with and without checksum verification", "",
             f"{'store':<8}{'images':>8}{'MB':>9}{'with (s)':>10}{'without (s)':>13}{'cost':>8}"
             f"{'checksums alone (s)':>21}{'share':>8}"]
    costs = {}
    with tempfile.TemporaryDirectory(prefix="bench-checksums-") as root:
        for name, (fmt, count, chunk) in stores.items():
            items = {f"{name}-{i:07d}": i for i in range(count)}
            with_, without, alone = compare(Path(root) / name, fmt, items, chunk, args.repeats)
            # The cost is judged by the checksums alone over the pass without them: the difference of two
            # whole passes is within the noise of a shared machine (it can come out negative).
            costs[name] = alone / without
            lines.append(f"{name:<8}{count:>8}{count * fmt.bytes_per_item / 1e6:>9.0f}{with_:>10.3f}{without:>13.3f}"
                         f"{100 * (with_ / without - 1):>7.1f}%{alone:>21.3f}{100 * costs[name]:>7.1f}%")
    lines += ["", "hash throughput on one core (GB/s): " + ", ".join(
        f"{name} {rate:.2f}" for name, rate in hash_rates(16 if args.smoke else 256).items())]
    worst = max(costs.values())
    lines.append(f"largest cost of verifying (checksums alone / pass without them): {100 * worst:.1f}% of the warm "
                 "store pass "
                 f"({'within' if worst <= LIMIT else 'OVER'} the {100 * LIMIT:.0f}% limit)")
    write_results(args.output, environment_lines() + [""] + lines)


if __name__ == "__main__":
    main()
