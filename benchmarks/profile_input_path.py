"""Where the time goes on the embedding / token-pass input path, with the model replaced by a no-op consumer.

A CPU proxy of a GPU profile: the same stages evaluate.py's embedding and train.py's token pass run
(nearid.store.fill.fill with a nearid.images.PixelLoader), timed one by one on 512 px JPEGs resized to
384 x 384 (so400m's input). Prints, from one run on this machine:

  1. per image, in one process: read the file, hash it (the store key, once per image and run),
     decode, RGB, resize, then either rescale + normalise to float32 in the worker (before) or
     hand over uint8 codes and normalise in the consumer (now); collation of a batch of 32 (--batch);
  2. the hand-over between processes: a DataLoader worker sending ready batches to the main
     process, float32 (1.77 MB per image) against uint8 (0.44 MB); pinning is not measured (no
     CUDA here: pinned copies to a GPU need one);
  3. the input path alone (decode + preprocess in 1 and 2 workers, the main process consuming
     nothing), float32 against uint8 hand-over: images/s per worker and the 2/1 worker ratio
     (goal >= 1.8 on a 2-core machine), with the machine's load average during the run;
  4. shard writes of so400m tokens (729 x 1152, float16 and int8) through the store's writer.

Usage: python benchmarks/profile_input_path.py [--images 256] [--smoke]
"""

import hashlib
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import (  # noqa: E402
    benchmark_parser,
    best_time,
    environment_lines,
    first_batch_timed,
    parse_benchmark_args,
    write_results,
)
from input_common import Precomputed, decode_rate, image_number, write_jpegs, write_json  # noqa: E402

from image_processing_nearid import NearIDImageProcessor, _pil_to_rgb, read_image_bytes  # noqa: E402
from nearid.images import PixelLoader, load_image  # noqa: E402
from nearid.store.fill import FillOptions, fill  # noqa: E402
from nearid.store.format import StoreFormat  # noqa: E402

GOAL_SCALING = 1.8


def parse_args(argv=None):
    parser = benchmark_parser(__doc__, "profile_input_path.txt", "tiny sizes, nothing recorded")
    parser.add_argument("--images", type=int, default=512, help="512 px JPEGs through the input path")
    parser.add_argument("--token-images", type=int, default=128, help="so400m token rows written as shards")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each timing (the best kept)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch, as the store's fill collates them")
    # a smoke run: two batches, so that each of 2 workers makes one
    return parse_benchmark_args(parser, argv, {"images": 8, "batch": 4, "token_images": 8, "repeats": 1})


class FloatPixels:
    """The processor as before: no `pixel_codes`, so a PixelLoader hands over float32 pixels."""

    def __init__(self, processor):
        self.processor, self.size, self.max_image_pixels = processor, processor.size, processor.max_image_pixels

    def __call__(self, images, return_tensors):
        return self.processor(images=images, return_tensors=return_tensors)


# --- 1. the stages of one image, in one process ---------------------------------------------------


def stage_times(paths, processor, batch: int, repeats: int) -> dict:
    """{stage: ms per image}, each stage timed alone on the output of the one before."""
    count = len(paths)
    data = [read_image_bytes(str(path), "bench") for path in paths]
    decoded = [load_image(blob, "bench") for blob in data]
    resized = [processor.pixel_codes(image) for image in decoded]
    loader = PixelLoader(processor)
    codes = [torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) for array in resized]
    floats = [loader.normalise(c[None])[0] for c in codes]

    def decode():
        for blob in data:
            with Image.open(io.BytesIO(blob)) as image:
                image.load()

    stages = {
        "read the file": lambda: [read_image_bytes(str(path), "bench") for path in paths],
        "hash (sha256 of the file, the store key)": lambda: [hashlib.sha256(blob).hexdigest() for blob in data],
        "decode (JPEG -> pixels, EXIF)": decode,
        "RGB (transparency onto white)": lambda: [_pil_to_rgb(image) for image in decoded],
        "resize to 384 x 384 (PIL, bilinear)": lambda: [processor.pixel_codes(image) for image in decoded],
        "before: rescale + normalise in the worker": lambda: processor(decoded),
        "now: uint8 codes [3, H, W] in the worker": lambda: [np.ascontiguousarray(a.transpose(2, 0, 1))
                                                             for a in resized],
        "now: rescale + normalise in the consumer (CPU)": lambda: loader.model_input(torch.stack(codes)),
        f"collate {batch} images, float32": lambda: [torch.stack(floats[i:i + batch]) for i in range(0, count, batch)],
        f"collate {batch} images, uint8": lambda: [torch.stack(codes[i:i + batch]) for i in range(0, count, batch)],
    }
    times = {name: 1000 * best_time(run, repeats, warm_up=False) / count for name, run in stages.items()}
    # processor(decoded) also resizes: its normalisation alone is the difference.
    times["before: rescale + normalise in the worker"] -= times["resize to 384 x 384 (PIL, bilinear)"]
    return times


# --- 2. the hand-over between processes -------------------------------------------------------------


class Ready(Dataset):
    """Batches already made: a worker only sends them (the hand-over alone)."""

    def __init__(self, batch: torch.Tensor, count: int):
        self.batch, self.count = batch, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.batch.clone()  # a fresh tensor per batch, as a worker's collate makes


def handover_ms(batch: torch.Tensor, batches: int, repeats: int) -> float:
    """ms per image of sending `batches` ready batches from 1 worker to the main process (after the first)."""

    def run():
        loader = DataLoader(Ready(batch, batches + 1), batch_size=None, num_workers=1)
        seconds = first_batch_timed(loader)[1]
        return seconds

    return 1000 * min(run() for _ in range(repeats)) / (batches * len(batch))


# --- 3. the input path alone ------------------------------------------------------------------------


class Files(Dataset):
    def __init__(self, paths, loader):
        self.paths, self.loader = paths, loader

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.loader((str(self.paths[index]), f"image file {self.paths[index]}"))


def input_path_rate(paths, loader: PixelLoader, workers: int, batch: int, repeats: int) -> tuple:
    """(images/s, images per CPU-second of the workers, main-process CPU ms per image) of decode + preprocess in
    `workers` worker processes, batches of `batch` collated as the store's fill does, consumed by a no-op (the main
    process only receives them); the best of `repeats` passes.

    CPU time does not depend on what else the machine runs: equal images per worker CPU-second at 1 and 2
    workers mean the work itself scales, and a wall-clock ratio below 2 is the machine's other load.
    """

    def run():
        children, own = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
        start = time.perf_counter()  # from the workers' start: timing from the first batch would favour 2 workers,
        # whose second batch is made beside the first
        data = DataLoader(Files(paths, loader), batch_size=batch, num_workers=workers, collate_fn=loader.collate)
        images = sum(len(batch) for batch in data)
        seconds = time.perf_counter() - start
        del data  # joins the workers, so their CPU time is counted
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        return images / seconds, len(paths) / worker_cpu, 1000 * (time.process_time() - own) / len(paths)

    runs = [run() for _ in range(repeats)]
    return max(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def _preprocess_all(paths, processor) -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker
    decode_rate(processor, paths)


def machine_rate(paths, processor, processes: int, repeats: int) -> float:
    """images/s of `processes` plain processes each decoding and preprocessing all of `paths` at once, nothing
    handed over: what this machine gives the workers' own work right now (other load included)."""
    context = torch.multiprocessing.get_context("fork")

    def run():
        children = [context.Process(target=_preprocess_all, args=(paths, processor)) for _ in range(processes)]
        for child in children:
            child.start()
        for child in children:
            child.join()

    return processes * len(paths) / best_time(run, repeats, warm_up=False)


# --- 4. shard writes --------------------------------------------------------------------------------


def write_ms(folder: Path, dtype: str, images: int, batch: int, repeats: int) -> float:
    """ms per image of the store's fill with a no-op encoder: conversion to `dtype`, checks, shard writes + fsync."""
    shape, encoder = (729, 1152), Precomputed((729, 1152), batch)
    items = {f"image-{i:07d}": i for i in range(images)}

    def run():
        target = folder / f"{dtype}-{time.perf_counter_ns()}"
        fill(target, "profile", StoreFormat(shape, dtype), items, image_number, encoder,
             FillOptions(batch_size=batch, shard_size=64, progress=False))

    return 1000 * best_time(run, repeats, warm_up=False) / images


# --- report -----------------------------------------------------------------------------------------


def stage_lines(stages: dict) -> list:
    before = sum(v for k, v in stages.items() if not k.startswith(("now", "collate")) or k.endswith("float32"))
    worker_now = sum(v for k, v in stages.items() if not k.startswith(("before", "now: rescale", "collate"))
                     or k.endswith("uint8"))
    lines = ["1. one image, one process (ms per image; share of a worker's work before / now):"]
    for name, ms in stages.items():
        share_before = "" if name.startswith("now") or name.endswith("uint8") else f"{100 * ms / before:5.1f}%"
        share_now = "" if name.startswith(("before", "now: rescale")) or name.endswith("float32") else \
            f"{100 * ms / worker_now:5.1f}%"
        lines.append(f"   {name:<50}{ms:>8.3f}  {share_before:>6} {share_now:>6}")
    lines.append(f"   worker total: {before:.2f} ms before, {worker_now:.2f} ms now (the normalisation moves to the "
                 "consumer: on a GPU a lookup over 0.44 MB; on this CPU the line above)")
    return lines


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    processor = NearIDImageProcessor()  # so400m's: 384 x 384, bilinear
    figures, load_before = {}, os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="profile-input-path-") as folder:
        paths = write_jpegs(Path(folder) / "jpeg512", args.images, 512)
        stages = stage_times(paths[:64], processor, args.batch, args.repeats)
        figures["stages_ms_per_image"] = stages
        lines = stage_lines(stages)
        batches = max(1, args.images // args.batch - 1)
        float_batch = torch.zeros(args.batch, 3, 384, 384)
        uint8_batch = torch.zeros(args.batch, 3, 384, 384, dtype=torch.uint8)
        figures["handover_float32_ms"] = handover_ms(float_batch, batches, args.repeats)
        figures["handover_uint8_ms"] = handover_ms(uint8_batch, batches, args.repeats)
        lines += ["", f"2. hand-over from 1 worker to the main process, batches of {args.batch} (ms per image):",
                  f"   float32 pixels (1.77 MB per image){figures['handover_float32_ms']:>12.3f}",
                  f"   uint8 codes    (0.44 MB per image){figures['handover_uint8_ms']:>12.3f}",
                  "   pinning: not measured (no CUDA on this machine; pin_memory needs a GPU)"]
        lines += rate_lines(paths, processor, args, figures)
        for dtype in ("float16", "int8"):
            figures[f"shard_write_{dtype}_ms"] = write_ms(Path(folder), dtype, args.token_images, args.batch,
                                                          args.repeats)
        lines += ["", f"4. so400m token rows into the store (fill with a no-op encoder: conversion, checks, shard "
                      f"writes + fsync; {args.token_images} rows, shards of 64), ms per image:",
                  *(f"   {dtype:<8}{figures[f'shard_write_{dtype}_ms']:>8.2f}" for dtype in ("float16", "int8"))]
    figures["load_average_before"], figures["load_average_after"] = load_before[0], os.getloadavg()[0]
    lines.append(f"load average (1 min) of this shared machine: {load_before[0]:.2f} before the run, "
                 f"{os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)")
    write_results(args.output, environment_lines() + lines)
    write_json(args.output and args.output.with_suffix(".json"), figures)


def rate_lines(paths, processor, args, figures) -> list:
    lines = ["", f"3. the input path alone: {len(paths)} 512 px JPEGs -> 384 x 384, batches of {args.batch}, "
                 "the main process consuming nothing (images/s, best of "
                 f"{args.repeats}; both hand-overs measured in this run):",
             f"   {'hand-over':<20}{'1 worker':>9}{'2 workers':>10}{'per worker':>11}{'2 / 1':>7}"
             f"{'img/worker-CPU-s (1, 2)':>25}{'2 / 1 CPU':>10}{'main CPU ms/img':>17}"]
    for name, loader in (("float32 (before)", PixelLoader(FloatPixels(processor))),
                         ("uint8 (now)", PixelLoader(processor))):
        (one, cpu_one, main_one), (two, cpu_two, main_two) = (
            input_path_rate(paths, loader, workers, args.batch, args.repeats) for workers in (1, 2))
        key = name.split()[0]
        figures.update({f"input_path_{key}_w1": one, f"input_path_{key}_w2": two, f"input_path_{key}_scaling": two / one,
                        f"input_path_{key}_per_worker_cpu_s_w1": cpu_one, f"input_path_{key}_per_worker_cpu_s_w2": cpu_two,
                        f"input_path_{key}_cpu_scaling": cpu_two / cpu_one,
                        f"input_path_{key}_main_cpu_ms": min(main_one, main_two)})
        lines.append(f"   {name:<20}{one:>9.0f}{two:>10.0f}{two / 2:>11.0f}{two / one:>7.2f}"
                     f"{f'{cpu_one:.0f}, {cpu_two:.0f}':>25}{cpu_two / cpu_one:>10.2f}{min(main_one, main_two):>17.2f}")
    ok = "yes" if figures["input_path_uint8_scaling"] >= GOAL_SCALING else "NO"
    lines += [f"   2 workers / 1 worker, uint8, wall clock: {figures['input_path_uint8_scaling']:.2f} (>= {GOAL_SCALING}: "
              f"{ok}); in the workers' CPU time: {2 * figures['input_path_uint8_cpu_scaling']:.2f} (2 = each worker "
              "as fast as one alone); uint8 / float32 at 2 workers: "
              f"{figures['input_path_uint8_w2'] / figures['input_path_float32_w2']:.2f}"]
    return lines + capacity_lines(paths, processor, args, figures)


def capacity_lines(paths, processor, args, figures) -> list:
    """What the 2/1 ratio can be on this machine: the main process's share of the work, and the machine's own
    2/1 ratio on the workers' work alone (2 plain processes against 1, measured in the same run)."""
    worker_ms = 1000 / figures["input_path_uint8_per_worker_cpu_s_w1"]
    main_ms = figures["input_path_uint8_main_cpu_ms"]
    # 1 worker: the worker is the bound (the main process runs on the other core); 2 workers on 2 cores: the
    # two cores do the workers' and the main process's work, 2 / (worker + main) images per ms.
    ceiling = 2 * worker_ms / (worker_ms + main_ms)
    one, two = (machine_rate(paths, processor, processes, args.repeats) for processes in (1, 2))
    figures.update({"input_path_worker_cpu_ms": worker_ms, "input_path_main_core_share": main_ms / worker_ms,
                    "input_path_idle_ceiling": ceiling, "machine_w1": one, "machine_w2": two,
                    "machine_scaling": two / one})
    path_over_machine = figures["input_path_uint8_scaling"] / (two / one)
    return [f"   the main process: {main_ms:.2f} ms of CPU per image against a worker's {worker_ms:.2f}, so it needs "
            f"{main_ms / worker_ms:.3f} of a core per worker's core; on an idle 2-core machine 2 workers reach at most "
            f"2 x {worker_ms:.2f} / ({worker_ms:.2f} + {main_ms:.2f}) = {ceiling:.2f} x 1 worker",
            f"   this machine now, the workers' work alone (decode + preprocess in plain processes, nothing handed "
            f"over): 1 process {one:.0f} images/s, 2 at once {two:.0f}: 2 / 1 = {two / one:.2f}",
            f"   input path 2 / 1 against the machine's 2 / 1 in this run: {path_over_machine:.2f} "
            "(1 = the hand-over and the main process cost the scaling nothing; the rest is the machine's other load)"]


if __name__ == "__main__":
    main()
