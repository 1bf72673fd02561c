"""The embedding pipeline from JPEG files: decode + preprocess in DataLoader workers, then the forward.

Prints, from one run on this machine:
  - decode + preprocess images/s of one worker (one process), for 512 px and 1024 px JPEGs, and the
    workers that keep a GPU at ~1,000 images/s busy (`--num-workers` of evaluate.py and train.py);
  - end-to-end images/s of evaluate.py's embedding from files (decode, preprocess, forward, store)
    against forward-only images/s on the same images and batches, for a small model and for so400m
    (random weights, float32). A ratio near 1 means decoding is hidden behind the forward.

Usage: python benchmarks/bench_embedding_pipeline.py [--workers 1] [--smoke]
"""

import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import (  # noqa: E402
    SMOKE_VISION,
    benchmark_parser,
    environment_lines,
    parse_benchmark_args,
    write_results,
)
from bench_train_compute import BENCH_VISION  # noqa: E402
from input_common import decode_rate, end_to_end_rate, forward_rate, nearid_folder, write_jpegs, write_json  # noqa: E402

from configuration_nearid import NearIDConfig  # noqa: E402
from image_processing_nearid import NearIDImageProcessor  # noqa: E402
from nearid.scorers import Scorer  # noqa: E402

GPU_IMAGES_PER_S = 1000


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "embedding_pipeline.txt", "tiny sizes and model, no so400m, nothing recorded")
    parser.set_defaults(small_vision=BENCH_VISION)
    parser.add_argument("--workers", type=int, default=1,
                        help="loader workers end to end (1: the other core of this 2-core machine runs the forward)")
    parser.add_argument("--decode-images", type=int, default=64, help="JPEGs per size for the decode rate")
    parser.add_argument("--small-images", type=int, default=256, help="images through the small model")
    parser.add_argument("--so400m-images", type=int, default=8, help="images through so400m (0.25 images/s here)")
    return parse_benchmark_args(parser, argv, {"decode_images": 4, "small_images": 8, "so400m_images": 0,
                                               "small_vision": SMOKE_VISION})


def decode_lines(folder: Path, args) -> tuple:
    processor = NearIDImageProcessor()  # so400m's: 384 x 384
    figures, lines = {}, ["decode + preprocess to 384 x 384 (NearIDImageProcessor), one process:"]
    for side in (512, 1024):
        rate = decode_rate(processor, write_jpegs(folder / f"jpeg{side}", args.decode_images, side))
        workers = math.ceil(GPU_IMAGES_PER_S / rate)
        figures[f"decode_per_worker_{side}px"] = rate
        lines.append(f"  {side} px JPEG: {rate:.0f} images/s per worker -> {workers} workers for "
                     f"{GPU_IMAGES_PER_S:,} images/s")
    return figures, lines


def pipeline_line(name: str, config, count: int, batch: int, folder: Path, workers: int) -> tuple:
    scorer = Scorer(str(nearid_folder(folder / f"{name}-model", config)))
    paths = write_jpegs(folder / f"{name}-jpeg", count, 512)
    forward = forward_rate(scorer, paths, batch)
    end_to_end = end_to_end_rate(scorer, paths, batch, workers, folder / f"{name}-cache")
    ratio = end_to_end / forward
    figures = {f"{name}_forward_images_per_s": forward, f"{name}_end_to_end_images_per_s": end_to_end,
               f"{name}_end_to_end_over_forward": ratio}
    return figures, (f"{name:<8}{count:>7}{batch:>7}{forward:>14.2f}{end_to_end:>14.2f}{ratio:>8.2f}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    small = NearIDConfig(vision_config={**NearIDConfig().vision_config, **args.small_vision},
                         embed_dim=args.small_vision["hidden_size"])
    models = [("small", small, args.small_images, 32)]
    if args.so400m_images:
        models.append(("so400m", NearIDConfig(), args.so400m_images, 4))
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as folder:
        figures, lines = decode_lines(Path(folder), args)
        lines += ["", f"end to end from 512 px JPEG files ({args.workers} loader worker, torch threads 1, float32) "
                      "against forward only on the same images:",
                  f"{'model':<8}{'images':>7}{'batch':>7}{'forward img/s':>14}{'end-to-end':>14}{'ratio':>8}"]
        for name, config, count, batch in models:
            model_figures, line = pipeline_line(name, config, count, batch, Path(folder), args.workers)
            figures.update(model_figures)
            lines.append(line)
    origin = " (bench_train_compute.py's)" if args.small_vision == BENCH_VISION else " (the smoke run's)"
    lines.append(f"small = {args.small_vision}{origin}, so400m = NearIDConfig(); random weights")
    write_results(args.output, environment_lines() + lines)
    write_json(args.output and args.output.with_suffix(".json"), figures)


if __name__ == "__main__":
    main()
