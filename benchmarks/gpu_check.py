"""The GPU check: the throughput figures of the real-run estimate, measured on one GPU in a few minutes.

    python benchmarks/gpu_check.py            # one CUDA GPU: writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke    # any machine, in seconds: a tiny model on the CPU

so400m with random weights, float32 weights under bf16 autocast, as evaluate.py and train.py run it
on a GPU (`--mixed-precision auto`). Measured, and recorded with the environment in one JSON file:

  1. forward images/s at batch 256, eager and through torch.compile (and their largest difference);
  2. end to end from 512 px JPEG files: evaluate.py's embedding (decode and preprocess in loader
     workers, forward, store) against the forward alone on the same batches;
  3. token-cache build images/s from the same files: train.py's token pass (`BackboneTokens` into
     the store), float16 and int8;
  4. head training steps/s at batch 128 x 6 from the float16 cache through train.py's training
     loader (warm, and cold after posix_fadvise(DONTNEED)), against the same steps on tokens already
     on the GPU; with the plain sequential read rate of the same shard files, warm and cold.

--smoke traces torch.compile without generating code (backend "eager": inductor's C++ build alone
takes longer than the whole smoke run on a CPU).
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from input_common import (  # noqa: E402
    SLOTS,
    EpochSamples,
    end_to_end_rate,
    forward_rate,
    loader_read_rate,
    nearid_folder,
    sequential_read_rate,
    shard_files,
    step_rates,
    synchronize,
    write_jpegs,
    write_json,
)

from configuration_nearid import NearIDConfig  # noqa: E402
from nearid.numerics import autocast, resolve_precision  # noqa: E402
from nearid.scorers import Scorer  # noqa: E402
from nearid.store import EmbeddingStore, FillOptions, ImageIndex, fill  # noqa: E402
from nearid.tokens import BackboneTokens  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="JPEG files, and images in each token cache")
    parser.add_argument("--batch", type=int, default=256, help="images per forward")
    parser.add_argument("--head-batch", type=int, default=128, help="samples (x 6 images) per head step")
    parser.add_argument("--steps", type=int, default=12, help="timed head steps of each kind per round")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)),
                        help="loader worker processes (default: the CPUs less two, at most 16)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON file (default: benchmarks/results/gpu_check.json; with --smoke, none)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.head_batch, args.steps, args.workers = 48, 8, 2, 3, 1
    elif args.output is None:
        args.output = RESULTS / "gpu_check.json"
    return args


def environment(device) -> dict:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "gpu": gpu,
            "cpus": os.cpu_count(), "device": str(device)}


def forward_figures(model, batch: int, precision: str, smoke: bool) -> dict:
    """get_image_features images/s at `batch`, eager and compiled, and their largest difference."""
    side = model.config.vision_config["image_size"]
    pixels = torch.rand(batch, 3, side, side, device=model.device) * 2 - 1
    compiled = torch.compile(model.get_image_features, **({"backend": "eager"} if smoke else {}))
    figures, outputs = {}, {}
    with torch.inference_mode(), autocast(model.device, precision):
        for name, forward in (("eager", model.get_image_features), ("compiled", compiled)):
            # The first call warms up, and for the compiled forward, compiles.
            figures[f"{name}_first_call_s"] = timed(lambda: outputs.setdefault(name, forward(pixels)), model.device)
            seconds = timed(lambda: [forward(pixels) for _ in range(3)], model.device)
            figures[f"forward_{name}_images_per_s"] = 3 * batch / seconds
    figures["compiled_max_abs_difference"] = float((outputs["eager"] - outputs["compiled"]).float().abs().max())
    return figures


def timed(fn, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def cache_build_rate(model, processor, paths, dtype: str, batch: int, workers: int, precision: str, folder) -> float:
    """images/s of train.py's token pass over image files: decode in workers, backbone, `dtype` tokens on disk."""
    encoder = BackboneTokens(model, processor, dtype, precision, model.device)
    index = ImageIndex()
    index.add_files(paths)
    options = FillOptions(batch_size=batch, num_workers=workers, device=str(model.device), progress=False)
    seconds = timed(lambda: fill(folder, encoder.fingerprint, encoder.format, index, encoder.loader, encoder,
                                 options), model.device)
    return len(paths) / seconds


def token_figures(scorer, paths, args, precision: str, work: Path) -> tuple:
    """Token-cache builds from `paths`, then reads of the float16 cache and head steps on it."""
    model, figures = scorer.model, {}
    for dtype in ("float16", "int8"):
        figures[f"cache_build_{dtype}_images_per_s"] = cache_build_rate(
            model, scorer.processor, paths, dtype, args.batch, args.workers, precision, work / f"cache-{dtype}")
    cache = work / "cache-float16"
    figures["sequential_warm_gb_per_s"] = sequential_read_rate(shard_files(cache), cold=False)
    figures["sequential_cold_gb_per_s"] = sequential_read_rate(shard_files(cache), cold=True)
    store = EmbeddingStore.open(cache)
    samples = EpochSamples(store.keys())
    per_epoch = len(samples) // args.head_batch
    for cold in (False, True):  # one epoch: every image read once
        figures[f"loader_{'cold' if cold else 'warm'}_gb_per_s"] = loader_read_rate(
            cache, samples, args.head_batch, per_epoch, args.workers, cold)
    model.freeze_backbone()
    steps = step_rates(model, store, samples, args.head_batch, args.steps, args.workers, precision)
    figures.update({f"head_{name}": value for name, value in steps.items()})
    return figures


def report_lines(figures: dict, env: dict, args, precision: str) -> list:
    f = figures
    return [
        f"GPU check on {env['gpu'] or 'the CPU (smoke)'}, {env['cpus']} CPUs, torch {env['torch']}; autocast "
        f"{precision}; {args.workers} loader workers",
        f"forward, batch {args.batch}: eager {f['forward_eager_images_per_s']:,.0f} images/s, compiled "
        f"{f['forward_compiled_images_per_s']:,.0f} images/s (compiling {f['compiled_first_call_s']:.0f} s, largest "
        f"difference {f['compiled_max_abs_difference']:.1e})",
        f"end to end from {args.images:,} JPEG files: {f['end_to_end_images_per_s']:,.0f} images/s; forward alone "
        f"{f['forward_only_images_per_s']:,.0f} images/s (ratio "
        f"{f['end_to_end_images_per_s'] / f['forward_only_images_per_s']:.2f})",
        f"token-cache build: float16 {f['cache_build_float16_images_per_s']:,.0f} images/s, int8 "
        f"{f['cache_build_int8_images_per_s']:,.0f} images/s",
        f"reads of the float16 cache: plain sequential {f['sequential_warm_gb_per_s']:.1f} GB/s warm, "
        f"{f['sequential_cold_gb_per_s']:.1f} GB/s cold; training loader {f['loader_warm_gb_per_s']:.1f} GB/s "
        f"warm, {f['loader_cold_gb_per_s']:.1f} GB/s cold",
        f"head steps, {args.head_batch} x {SLOTS} images: {f['head_loader_steps_per_s']:.2f} steps/s from the cache "
        f"(warm), {f['head_resident_steps_per_s']:.2f} steps/s on tokens already on the device "
        f"(ratio {f['head_overlap']:.2f})",
    ]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    precision = resolve_precision("auto", device)
    config = NearIDConfig(vision_config={**NearIDConfig().vision_config, **SMOKE_VISION},
                          embed_dim=SMOKE_VISION["hidden_size"]) if args.smoke else NearIDConfig()
    env, started = environment(device), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        work = Path(folder)
        scorer = Scorer(str(nearid_folder(work / "model", config)), device=str(device), mixed_precision=precision)
        paths = write_jpegs(work / "jpeg", args.images, 512)
        figures = forward_figures(scorer.model, args.batch, precision, args.smoke)
        figures["forward_only_images_per_s"] = forward_rate(scorer, paths, args.batch)
        figures["end_to_end_images_per_s"] = end_to_end_rate(scorer, paths, args.batch, args.workers,
                                                             work / "embeddings")
        figures.update(token_figures(scorer, paths, args, precision, work))
    lines = report_lines(figures, env, args, precision)
    print("\n".join(lines))
    write_json(args.output, {"environment": env, "arguments": {k: str(v) for k, v in vars(args).items()},
                             "seconds": time.perf_counter() - started, "figures": figures, "report": lines})


if __name__ == "__main__":
    main()
