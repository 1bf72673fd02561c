"""Images/second of NearIDImageProcessor vs transformers' SiglipImageProcessorPil on one CPU core.

Both get the same 64 RGB 512x512 PIL images and resize to 384x384 with the settings of
preprocessor_config.json. Each is warmed up once, then timed as the best of several repeats (the
least disturbed run). The outputs are checked to agree before any number is reported.

    python benchmarks/bench_image_processor.py            # writes benchmarks/results/image_processor.txt
    python benchmarks/bench_image_processor.py --smoke    # a few images, seconds, writes nothing
"""

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import best_time, cpu_model, write_results  # noqa: E402

from image_processing_nearid import NearIDImageProcessor  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "image_processor.txt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64, help="images per batch")
    parser.add_argument("--image-size", type=int, default=512, help="side of the square input images")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per processor; the best counts")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the report")
    parser.add_argument("--smoke", action="store_true", help="4 images, 1 repeat, no report file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.repeats, args.output = 4, 1, None
    return args


def pin_to_one_core():
    """One core and one torch thread, so the ratio does not depend on the machine's core count."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def make_images(count, side, seed=0):
    """Smooth gradients plus noise: realistic enough, and deterministic."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    images = []
    for _ in range(count):
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        noise = rng.normal(0, 20, (side, side, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def main(argv=None):
    args = parse_args(argv)
    pin_to_one_core()
    config = json.loads((REPO_ROOT / "preprocessor_config.json").read_text())
    ours = NearIDImageProcessor.from_dict(config)
    settings = {k: config[k] for k in ("size", "resample", "rescale_factor", "image_mean", "image_std")}
    reference = SiglipImageProcessorPil(**settings)
    images = make_images(args.num_images, args.image_size)

    expected = reference(images, return_tensors="pt")["pixel_values"]
    got = ours(images)["pixel_values"]
    if got.shape != expected.shape:
        raise SystemExit(f"Output shapes disagree: {tuple(got.shape)} vs reference {tuple(expected.shape)}")
    max_diff = (expected - got).abs().max().item()
    if max_diff > 1e-6:
        raise SystemExit(f"Outputs disagree with the reference: max |diff| {max_diff} > 1e-6")

    seconds = {
        "SiglipImageProcessorPil": best_time(lambda: reference(images, return_tensors="pt"), args.repeats),
        "NearIDImageProcessor": best_time(lambda: ours(images), args.repeats),
    }
    rate = {name: args.num_images / s for name, s in seconds.items()}
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"cpu: {cpu_model()} (1 core pinned, torch threads {torch.get_num_threads()})",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"pillow {PIL.__version__}, numpy {np.__version__}",
        f"task: {args.num_images} RGB {args.image_size}x{args.image_size} PIL images -> "
        f"{tuple(got.shape[1:])}, resample={config['resample']}, best of {args.repeats} after a warm-up",
        f"outputs agree: max |diff| = {max_diff:.3g}",
        *(f"{name:>24}: {rate[name]:8.1f} images/s ({seconds[name] * 1e3:.1f} ms per batch)" for name in seconds),
        f"speed-up: {rate['NearIDImageProcessor'] / rate['SiglipImageProcessorPil']:.2f}x",
    ]
    write_results(args.output, lines)
    return rate


if __name__ == "__main__":
    main()
