"""Training compute of an 11-epoch run: backbone token cache vs the reference design.

The reference design runs the frozen backbone on all 6 slots of every sample at every step
(`train.py --no-token-cache`). The default computes each image's backbone tokens once and trains
the head on them. This script runs `train.main` both ways, one after the other in this process, on
the same synthetic data and config, and reports:

  - wall time of each run, data preparation and the cache build included,
  - backbone image-forwards of each run, counted by wrapping `NearIDModel.forward_features`
    (cache: every image the 11 epochs use, plus one padding image; reference: 6 slots x samples per step x steps),
  - whether both trained the same thing: the logged losses of every step (the cached run stores
    float32 tokens, so both feed the head the same numbers),
  - the analytic compute of the real setting from the numbers in docs/method.md, with its assumptions.

The synthetic data keeps the proportions of the real training set: several distractor sources,
MTG rows entering 4 times per epoch (about half of the samples, as 4 x ~4,750 MTG rows beside
19,386 NearID rows), about a quarter of the NearID rows with 2 views. The random SigLIP base is small but
shaped so that the backbone dominates the head, as with so400m.

so400m's rates on a GPU (forward, token-cache building, head steps from the cache) are measured by
benchmarks/gpu_check.py, and benchmarks/estimate_real_run.py turns them into wall time.

    python benchmarks/bench_train_compute.py            # writes benchmarks/results/bench_train_compute.txt
    python benchmarks/bench_train_compute.py --smoke    # 2 epochs on a few rows, a tiny model, writes nothing
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SMOKE_VISION, environment_lines, timed, write_results  # noqa: E402
from bench_forward import forward_flops  # noqa: E402

from nearid.commands import train  # noqa: E402
from configuration_nearid import NearIDConfig  # noqa: E402
from modeling_nearid import NearIDModel  # noqa: E402
from nearid.synthetic import builders  # noqa: E402
from nearid.models import save_siglip_checkpoint  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_train_compute.txt"
SLOTS = 6
TARGET_RATIO = 5.0
# A small random SigLIP whose backbone costs ~600x its (folded) head; so400m's costs ~8,000x.
BENCH_VISION = dict(image_size=96, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=6,
                    intermediate_size=768)
SOURCE_NAMES = ("flux", "sdxl", "powerpaint", "qwen", "flux_1024", "sdxl_1024", "qwen_1328", "fluxc", "fluxc_1024")

# The real setting (docs/method.md sections 2, 3, 5).
REAL_NEARID_ROWS = 19_386
REAL_BATCH = 128
REAL_STEPS_PER_EPOCH = 300
MTG_REPEATS = 4  # train.py --mtg_repeats: the reference concatenates MTG 4 times
# Not in docs/method.md: inferred from ~300 steps x 128 samples per epoch = 19,386 NearID rows + 4 x MTG rows.
REAL_MTG_ROWS = round((REAL_STEPS_PER_EPOCH * REAL_BATCH - REAL_NEARID_ROWS) / MTG_REPEATS)
SO400M_GFLOP = 670  # per image, docs/method.md section 5
H200_IMAGES_PER_S = 1_180  # the backbone's physical limit on an H200 (docs/method.md section 5)
TRAIN_OVER_FORWARD = 3  # a training step of the head costs ~3 forwards (forward + backward)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=11, help="epochs of each run (the paper's 11)")
    parser.add_argument("--identities", type=int, default=48, help="NearID rows (one object identity each)")
    parser.add_argument("--mtg-rows", type=int, default=12, help="MTG train rows (each enters 4 times per epoch)")
    parser.add_argument("--sources", type=int, default=4, help=f"distractor sources, at most {len(SOURCE_NAMES)}")
    parser.add_argument("--batch", type=int, default=16, help="samples (6 slots each) per step")
    parser.add_argument("--data-image-size", type=int, default=96, help="side of the synthetic images in pixels")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps the timings steady on a shared machine, where several "
                             "threads stall whenever another process takes one of their cores")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp folder)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the report")
    parser.add_argument("--smoke", action="store_true",
                        help="2 epochs on 4 rows of 32 px images, a tiny model, no report file")
    args = parser.parse_args(argv)
    if not 1 <= args.sources <= len(SOURCE_NAMES):
        parser.error(f"--sources must be between 1 and {len(SOURCE_NAMES)}, got {args.sources}")
    args.vision = BENCH_VISION
    if args.smoke:  # every step of both runs, on sizes that take a moment
        args.epochs, args.identities, args.mtg_rows, args.batch, args.output = 2, 4, 1, 4, None
        args.vision, args.data_image_size = SMOKE_VISION, SMOKE_VISION["image_size"]
    return args


# --- inputs -----------------------------------------------------------------------------------------


def write_base_model(folder: Path, vision: dict) -> Path:
    """A random SigLIP vision checkpoint of `vision` with a SigLIP preprocessor config, like a Hub snapshot."""
    return save_siglip_checkpoint(folder, vision)


def write_training_data(folder: Path, args) -> dict:
    """Positives, one folder per distractor source and MTG; returns the train.py data flags' values."""
    cfg = builders.SyntheticConfig(output_dir=str(folder), num_identities=args.identities,
                                           image_size=args.data_image_size, sources=SOURCE_NAMES[:args.sources],
                                           mtg_train=args.mtg_rows, mtg_test=1)
    positives, sources = builders.build_benchmark(cfg)
    positives.save_to_disk(str(folder / "positives"))
    for name, dataset in sources.items():
        dataset.save_to_disk(str(folder / name))
    builders.build_mtg(cfg).save_to_disk(str(folder / "mtg"))
    return {"positives": folder / "positives", "sources": list(sources), "mtg": folder / "mtg",
            "views_per_row": list(positives["n_images"])}


def samples_per_epoch(data: dict, args) -> int:
    return len(data["views_per_row"]) + MTG_REPEATS * args.mtg_rows


def train_arguments(data: dict, base_model: Path, out: Path, args, *extra) -> list:
    # The paper warms up for 100 of 3,300 steps; keep that share of this run's steps.
    warmup = max(1, round(100 / 3300 * args.epochs * (samples_per_epoch(data, args) // args.batch)))
    argv = ["--positives", str(data["positives"]), "--mtg", str(data["mtg"]), "--base-model", str(base_model),
            "--output-dir", str(out), "--num-epochs", str(args.epochs), "--per-device-batch-size", str(args.batch),
            "--warmup-steps", str(warmup), "--log-steps", "1", "--no-export",
            "--cache-dtype", "float32", *extra]
    for name in data["sources"]:
        argv += ["--source", f"{name}={data['positives'].parent / name}"]
    return argv


# --- one measured run -------------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    backbone_images: int
    steps: int
    losses: list


@contextlib.contextmanager
def counting_backbone_images():
    """Count the images that go through `NearIDModel.forward_features` (the backbone) while inside."""
    counter = {"images": 0}
    original = NearIDModel.forward_features

    def counted(self, pixel_values):
        counter["images"] += pixel_values.shape[0]
        return original(self, pixel_values)

    NearIDModel.forward_features = counted
    try:
        yield counter
    finally:
        NearIDModel.forward_features = original


def logged_losses(out: Path) -> list:
    lines = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def measure_run(argv: list, out: Path) -> Measured:
    """Wall time and backbone images of one `train.main` run; its log lines go to OUT.log."""
    with counting_backbone_images() as counter, open(f"{out}.log", "w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        results, seconds = timed(lambda: train.main(argv))
    return Measured(seconds, counter["images"], results["global_step"], logged_losses(out))


def warm_up_imports():
    """Import what train.main imports lazily, so neither timed run pays for it."""
    import accelerate  # noqa: F401
    from transformers import HfArgumentParser, get_cosine_schedule_with_warmup  # noqa: F401

    import image_processing_nearid  # noqa: F401
    from nearid.reports import plots, results_file, run_outputs  # noqa: F401
    from nearid.training import inputs, loop, release, state, tracking  # noqa: F401


# --- compute model ----------------------------------------------------------------------------------


def expected_distinct(choices: int, draws: int) -> float:
    """Expected number of different values among `draws` uniform draws from `choices` values."""
    return choices * (1 - (1 - 1 / choices) ** draws)


def expected_cached_images(views_per_row, mtg_rows: int, sources: int, epochs: int) -> float:
    """Images an `epochs`-long run uses: every view, the distractors its per-epoch draws pick, MTG, the pad.

    Each epoch every present view draws one of `sources` distractors (its own scene's) uniformly, so a
    view's distractors used over the run are the distinct values among `epochs` draws. An MTG row
    shows 4 images whatever its repeats. The padding slot is one cached image.
    """
    per_view = 1 + expected_distinct(sources, epochs)
    return sum(views_per_row) * per_view + 4 * mtg_rows + 1


def head_forward_flops(config: NearIDConfig) -> float:
    """FLOPs of this repo's MAP head for one image: the probe folded into the key projection.

    Scores and pooling read the tokens once per attention head; then value and output projections
    and the MLP act on a single token.
    """
    v = config.vision_config
    tokens, width, heads, mlp = config.num_patches, v["hidden_size"], v["num_attention_heads"], v["intermediate_size"]
    return 2 * 2 * tokens * width * heads + 2 * 2 * width * width + 2 * 2 * width * mlp


def compute_ratio(reference_images, cached_images, head_slots, backbone_flops, head_train_flops) -> float:
    """(reference compute) / (cached compute); both train the head on every slot of every step."""
    head = head_slots * head_train_flops
    return (reference_images * backbone_flops + head) / (cached_images * backbone_flops + head)


# --- report -----------------------------------------------------------------------------------------


def measured_lines(cached: Measured, reference: Measured, data: dict, args) -> list:
    config = NearIDConfig(vision_config={**NearIDConfig().vision_config, **args.vision},
                          embed_dim=args.vision["hidden_size"])
    backbone, head = forward_flops(config), head_forward_flops(config)
    steps_per_epoch = samples_per_epoch(data, args) // args.batch
    expected = expected_cached_images(data["views_per_row"], args.mtg_rows, args.sources, args.epochs)
    wall = reference.seconds / cached.seconds
    forwards = reference.backbone_images / cached.backbone_images
    flops = compute_ratio(reference.backbone_images, cached.backbone_images, SLOTS * args.batch * reference.steps,
                          backbone, TRAIN_OVER_FORWARD * head)
    two_view = sum(v == 2 for v in data["views_per_row"])
    return [
        f"data: {len(data['views_per_row'])} NearID rows ({two_view} with 2 views), {args.sources} distractor "
        f"sources, {args.mtg_rows} MTG rows x {MTG_REPEATS} = {samples_per_epoch(data, args)} samples/epoch; "
        f"{args.data_image_size}px images",
        f"model: random SigLIP {args.vision}: backbone {backbone / 1e6:.0f} MFLOP/image, "
        f"head {head / 1e6:.2f} MFLOP/image",
        f"config: {args.epochs} epochs x {steps_per_epoch} steps x {args.batch} samples "
        f"({SLOTS} slots); fp32; same seed and arguments, cached run with --cache-dtype float32",
        "",
        f"{'run':<36}{'wall s':>9}{'backbone images':>17}",
        f"{'token cache (build + training)':<36}{cached.seconds:>9.1f}{cached.backbone_images:>17,}",
        f"{'reference (--no-token-cache)':<36}{reference.seconds:>9.1f}{reference.backbone_images:>17,}",
        f"backbone images expected: cache {expected:,.0f} (each view + expected distinct distractor draws + MTG "
        f"+ 1 pad), reference {SLOTS * steps_per_epoch * args.batch * args.epochs:,} "
        f"({SLOTS} x {steps_per_epoch * args.batch} samples x {args.epochs} epochs)",
        f"wall-time ratio reference / cache: {wall:.2f}x ({verdict(wall)})",
        f"backbone-forward ratio: {forwards:.2f}x ({verdict(forwards)})",
        f"compute ratio (forwards x backbone FLOPs + {TRAIN_OVER_FORWARD} x head FLOPs per slot and step): "
        f"{flops:.2f}x ({verdict(flops)})",
        same_training_line(cached.losses, reference.losses),
    ]


def verdict(ratio: float) -> str:
    return f">= {TARGET_RATIO:.0f}x: {'yes' if ratio >= TARGET_RATIO else 'NO'}"


def same_training_line(cached: list, reference: list, tolerance=1e-4) -> str:
    """Both runs log the loss of every step; float32 tokens make them equal up to rounding."""
    if len(cached) != len(reference) or not cached:
        return f"same training: NO (logged {len(cached)} and {len(reference)} losses)"
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(cached, reference))
    same = worst <= tolerance
    return (f"same training: {'yes' if same else 'NO'}: final loss {cached[-1]:.6f} (cache) vs {reference[-1]:.6f} "
            f"(reference); largest relative difference over {len(cached)} steps {worst:.1e} (tolerance {tolerance:g})")


def real_setting_lines(epochs: int) -> list:
    """Analytic compute of the paper's run with and without the cache, for several source counts."""
    config = NearIDConfig()
    head, unfolded_head = head_forward_flops(config), 3.9e9  # docs/method.md: 3.9 GFLOP as nn.MultiheadAttention computes it
    samples_per_epoch = REAL_STEPS_PER_EPOCH * REAL_BATCH
    reference_images = epochs * SLOTS * samples_per_epoch
    lines = [
        "",
        f"real setting, analytic (docs/method.md sections 2, 3, 5), {epochs} epochs. Assumptions:",
        f"  {REAL_NEARID_ROWS:,} NearID rows, all with 3 views (a 2-view row still costs the reference {SLOTS} slots "
        "but the cache fewer images: the cache's worst case);",
        f"  {REAL_MTG_ROWS:,} MTG rows x {MTG_REPEATS} (not in docs/method.md: ~{REAL_STEPS_PER_EPOCH} steps x "
        f"{REAL_BATCH} samples per epoch minus the NearID rows);",
        f"  backbone {SO400M_GFLOP} GFLOP/image; head training {TRAIN_OVER_FORWARD} x {head / 1e9:.3f} GFLOP per slot "
        f"and step (this repo's folded head; {TRAIN_OVER_FORWARD} x 3.9 GFLOP unfolded), the same in both designs.",
        f"  reference: {epochs} x {SLOTS} slots x {samples_per_epoch:,} samples = {reference_images:,} backbone images "
        f"= {reference_images * SO400M_GFLOP / 1e6:,.0f} PFLOP "
        f"(+ {reference_images * TRAIN_OVER_FORWARD * head / 1e15:.1f} PFLOP head training)",
        f"  cache: each view once, plus the distinct distractors among its {epochs} per-epoch draws from S sources: "
        f"S(1 - (1 - 1/S)^{epochs}) expected; 4 images per MTG row whatever its repeats; 1 pad",
        f"{'S sources':>11}{'cache images':>14}{'cache PFLOP':>13}{'ratio':>8}{'ratio, unfolded head':>22}"
        f"{'backbone minutes at 1,180 img/s (H200), ref / cache':>54}",
    ]
    for sources in (1, 2, 4, 7, 9):
        images = expected_cached_images([3] * REAL_NEARID_ROWS, REAL_MTG_ROWS, sources, epochs)
        backbone = SO400M_GFLOP * 1e9
        cache_flops = images * backbone + reference_images * TRAIN_OVER_FORWARD * head
        ratio = compute_ratio(reference_images, images, reference_images, backbone, TRAIN_OVER_FORWARD * head)
        unfolded = compute_ratio(reference_images, images, reference_images, backbone,
                                 TRAIN_OVER_FORWARD * unfolded_head)
        minutes = f"{reference_images / H200_IMAGES_PER_S / 60:.0f} / {images / H200_IMAGES_PER_S / 60:.1f}"
        lines.append(f"{sources:>11}{images:>14,.0f}{cache_flops / 1e15:>13,.0f}{ratio:>7.1f}x{unfolded:>21.1f}x"
                     f"{minutes:>54}")
    lines.append("  (S = 7: the Table-1 settings; S = 9: every published source)")
    return lines


# --- main -------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-train-")))
        workdir.mkdir(parents=True, exist_ok=True)
        data = write_training_data(workdir / "data", args)
        base_model = write_base_model(workdir / "base-model", args.vision)
        warm_up_imports()
        # The cached run goes first: anything a first run pays for once counts against the cache.
        runs = {}
        for name, extra in (("cached", ()), ("reference", ("--no-token-cache",))):
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)  # a token cache left by an earlier run would be reused
            runs[name] = measure_run(train_arguments(data, base_model, out, args, *extra), out)
        lines = environment_lines() + measured_lines(runs["cached"], runs["reference"], data, args)
    lines += real_setting_lines(args.epochs)
    write_results(args.output, lines)


if __name__ == "__main__":
    main()
