"""The GPU check: the throughput figures of the real-run estimate, measured on one GPU in a few minutes.

    python benchmarks/gpu_check.py            # one CUDA GPU: writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke    # any machine, in seconds: a tiny model on the CPU

so400m with random weights, float32 weights under bf16 autocast, as evaluate.py and train.py run it
on a GPU (`--mixed-precision auto`). Measured, and recorded with the environment in one JSON file:

  1. forward images/s at batch 256, eager and through torch.compile (and their largest difference;
     compiling comes last, so the other figures are recorded even if it runs long);
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
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import RESULTS, SMOKE_VISION, timed  # noqa: E402
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
    write_jpegs,
    write_json,
)

from configuration_nearid import NearIDConfig  # noqa: E402
from nearid.numerics import autocast, resolve_precision  # noqa: E402
from nearid.scorers import Scorer  # noqa: E402
from nearid.store.embedding_store import EmbeddingStore  # noqa: E402
from nearid.store.fill import FillOptions, fill  # noqa: E402
from nearid.store.image_index import ImageIndex  # noqa: E402
from nearid.tokens import BackboneTokens  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="JPEG files, and images in each token cache")
    parser.add_argument("--batch", type=int, default=256, help="images per forward")
    parser.add_argument("--head-batch", type=int, default=128, help="samples (x 6 images) per head step")
    parser.add_argument("--steps", type=int, default=12, help="timed head steps of each kind per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of head steps (the best kept)")
    parser.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)),
                        help="worker processes decoding images (default: the CPUs less two, at most 16)")
    parser.add_argument("--loader-workers", type=int, default=4,
                        help="worker processes of the training loader (its ring: 2 buffers per worker + 2, 1.3 GB "
                             "each at batch 128 in float16)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON file (default: benchmarks/results/gpu_check.json; with --smoke, none)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        # every stage once, worker processes included: 4 samples of 6 images, 2 loader batches an epoch
        args.images, args.batch, args.head_batch, args.steps, args.rounds = 24, 8, 2, 3, 1
        args.workers, args.loader_workers = 1, 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here: the check measures so400m on a GPU (pass --smoke to try the script on a CPU)")
    elif args.output is None:
        args.output = RESULTS / "gpu_check.json"
    return args


def environment(device) -> dict:
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "gpu": gpu,
            "cpus": os.cpu_count(), "device": str(device)}


def forward_figures(model, batch: int, precision: str, compile_options: dict | None) -> dict:
    """get_image_features images/s at `batch`, eager, or compiled with `compile_options` (then with its largest
    difference from eager)."""
    side = model.config.vision_config["image_size"]
    pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(model.device) * 2 - 1
    name = "eager" if compile_options is None else "compiled"
    forward = model.get_image_features if compile_options is None else \
        torch.compile(model.get_image_features, **compile_options)
    with torch.inference_mode(), autocast(model.device, precision):
        # The first call warms up, and for the compiled forward, compiles.
        output, first = timed(lambda: forward(pixels))
        _, seconds = timed(lambda: [forward(pixels) for _ in range(3)])
        figures = {f"{name}_first_call_s": first, f"forward_{name}_images_per_s": 3 * batch / seconds}
        if compile_options is not None:
            eager = model.get_image_features(pixels)
            figures["compiled_max_abs_difference"] = float((eager - output).float().abs().max())
    return figures


def cache_build_rate(model, processor, paths, dtype: str, batch: int, workers: int, precision: str, root) -> float:
    """images/s of train.py's token pass over image files: decode in workers, backbone, `dtype` tokens on disk
    (the store of the tokens' fingerprint under `root`)."""
    encoder = BackboneTokens(model, processor, dtype, precision, model.device)
    index = ImageIndex()
    index.add_files(paths)
    options = FillOptions(batch_size=batch, num_workers=workers, device=str(model.device), progress=False)
    _, seconds = timed(lambda: fill(root, encoder.fingerprint, encoder.format, index, encoder.loader, encoder,
                                    options))
    return len(paths) / seconds


def cache_figures(scorer, paths, args, precision: str, work: Path) -> dict:
    """Token-cache build images/s from `paths`, float16 and int8 (their stores under work / "cache-<dtype>")."""
    return {f"cache_build_{dtype}_images_per_s": cache_build_rate(scorer.model, scorer.processor, paths, dtype,
                                                                  args.batch, args.workers, precision,
                                                                  work / f"cache-{dtype}")
            for dtype in ("float16", "int8")}


def read_and_step_figures(scorer, args, precision: str, cache: Path) -> dict:
    """Plain and loader reads of the float16 cache under `cache` (one epoch: every image once), and head steps
    on it."""
    model = scorer.model
    tokens = BackboneTokens(model, scorer.processor, "float16", precision, model.device)
    store = EmbeddingStore.open(cache, tokens.fingerprint)
    figures = {"sequential_warm_gb_per_s": sequential_read_rate(shard_files(store.folder), cold=False),
               "sequential_cold_gb_per_s": sequential_read_rate(shard_files(store.folder), cold=True)}
    samples = EpochSamples(store.keys())
    per_epoch = len(samples) // args.head_batch
    for cold in (False, True):
        state = "cold" if cold else "warm"
        figures[f"loader_{state}_gb_per_s"], figures[f"loader_{state}_first_batch_s"], _, _ = loader_read_rate(
            store, samples, args.head_batch, per_epoch, args.loader_workers, cold)
    model.freeze_backbone()
    steps = step_rates(model, store, samples, args.head_batch, args.steps, args.loader_workers, precision,
                       rounds=args.rounds)
    return {**figures, **{f"head_{name}": value for name, value in steps.items()}}


class Figures(dict):
    """The recorded figures; one that a failed stage left out reads as nan in the report."""

    def __missing__(self, key):
        return float("nan")


def report_lines(figures: dict, env: dict, args, precision: str) -> list:
    f = Figures(figures)
    errors = [f"stage {key[6:-6]} failed: {value}" for key, value in figures.items() if key.endswith("_error")]
    return [
        f"GPU check on {env['gpu'] or 'the CPU (smoke)'}, {env['cpus']} CPUs, torch {env['torch']}; autocast "
        f"{precision}; {args.workers} decoding workers, {args.loader_workers} training-loader workers",
        f"forward, batch {args.batch}: eager {f['forward_eager_images_per_s']:,.0f} images/s, compiled "
        f"{f['forward_compiled_images_per_s']:,.0f} images/s (compiling {f['compiled_first_call_s']:.0f} s, largest "
        f"difference {f['compiled_max_abs_difference']:.1e})",
        f"end to end from {args.images:,} JPEG files: {f['end_to_end_images_per_s']:,.0f} images/s; forward alone "
        f"on {min(args.images, 8 * args.batch):,} of them {f['forward_only_images_per_s']:,.0f} images/s (ratio "
        f"{f['end_to_end_images_per_s'] / f['forward_only_images_per_s']:.2f})",
        f"token-cache build: float16 {f['cache_build_float16_images_per_s']:,.0f} images/s, int8 "
        f"{f['cache_build_int8_images_per_s']:,.0f} images/s",
        f"reads of the float16 cache: plain sequential {f['sequential_warm_gb_per_s']:.1f} GB/s warm, "
        f"{f['sequential_cold_gb_per_s']:.1f} GB/s cold; training loader {f['loader_warm_gb_per_s']:.1f} GB/s "
        f"warm, {f['loader_cold_gb_per_s']:.1f} GB/s cold",
        f"head steps, {args.head_batch} x {SLOTS} images: {f['head_loader_steps_per_s']:.2f} steps/s from the cache "
        f"(warm), {f['head_resident_steps_per_s']:.2f} steps/s on tokens already on the device "
        f"(ratio {f['head_overlap']:.2f})",
        *errors,
    ]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    precision = resolve_precision("auto", device)
    config = NearIDConfig(vision_config={**NearIDConfig().vision_config, **SMOKE_VISION},
                          embed_dim=SMOKE_VISION["hidden_size"]) if args.smoke else NearIDConfig()
    env, started, figures = environment(device), time.perf_counter(), {}

    def record(**more):  # after every stage, so a stage that fails leaves the figures before it recorded
        write_json(args.output, {"environment": env, "arguments": {k: str(v) for k, v in vars(args).items()},
                                 "seconds": time.perf_counter() - started, "figures": figures, **more})

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        work = Path(folder)
        scorer = Scorer(str(nearid_folder(work / "model", config)), device=str(device), mixed_precision=precision)
        paths = write_jpegs(work / "jpeg", args.images, 512)
        compile_options = {"backend": "eager"} if args.smoke else {}
        stages = {  # the slowest to start, compiling, last: a stage cut short leaves the others recorded
            "forward": lambda: forward_figures(scorer.model, args.batch, precision, None),
            "end_to_end": lambda: {
                "forward_only_images_per_s": forward_rate(scorer, paths[:8 * args.batch], args.batch),
                "end_to_end_images_per_s": end_to_end_rate(scorer, paths, args.batch, args.workers,
                                                           work / "embeddings")},
            "cache_build": lambda: cache_figures(scorer, paths, args, precision, work),
            "reads_and_steps": lambda: read_and_step_figures(scorer, args, precision, work / "cache-float16"),
            "compiled": lambda: forward_figures(scorer.model, args.batch, precision, compile_options),
        }
        for name, stage in stages.items():
            stage_started = time.perf_counter()
            try:
                figures.update(stage())
            except Exception as error:  # one lease, one try: a failed stage is recorded, the others still run
                figures[f"stage_{name}_error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            figures[f"stage_{name}_s"] = time.perf_counter() - stage_started
            record()
    lines = report_lines(figures, env, args, precision)
    print("\n".join(lines))
    record(report=lines)


if __name__ == "__main__":
    main()
