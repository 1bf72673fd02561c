"""Main job: NearID end to end on the synthetic benchmark, on a CPU, in about two minutes.

  1. write a deterministic synthetic benchmark with the Hub schemas (positives, two distractor
     sources, MTG, a DreamBench++-style folder with human ratings) and train/val/test split files,
  2. save a small random SigLIP as the base checkpoint (stand-in for google/siglip2-so400m-patch14-384),
  3. build the untrained NearID (the base's pretrained MAP head copied in) and evaluate it,
  4. train the head with train.py (cached backbone tokens, the paper's loss), which exports a
     complete Hub repo folder with its model card,
  5. evaluate the release folder (its configs and safetensors weights, loaded by this checkout's
     NearID classes as every command loads a model; the folder's own code is never run),
  6. print the before/after table in Table-1 format, and the near-identity retrieval table, and write
     them to demo_results.md (every number in demo_results.json).
Nothing is downloaded. The backbone is random and tiny, so the numbers show that the head learns
identity over background on this data, not NearID's accuracy on the real benchmark.

Usage: python demo.py [--output-dir demo_outputs] [--num-identities 200] [--epochs 20]
"""

from dataclasses import dataclass
from pathlib import Path

from nearid.cli import build_parser, lazy_module, option, parse, user_errors
from nearid.commands import evaluate, synthetic, train
from nearid.io import atomic_write_json, atomic_write_text
from nearid.numerics import cpu_threads
from nearid.reports import tables

heatmaps = lazy_module("nearid.heatmaps")
scorers = lazy_module("nearid.scorers")

SMALL_SIGLIP = dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
SOURCES = ("flux", "sdxl")
# The demo computes on this many torch threads on any machine, so that its numbers (the ones the README shows)
# do not change with the machine's core count: float sums add in another order on another thread count.
DEMO_THREADS = 2


def export_untrained(base: Path, folder: Path) -> Path:
    from image_processing_nearid import NearIDImageProcessor
    from modeling_nearid import NearIDModel
    from nearid.hub import export_hub_folder

    model = NearIDModel.from_siglip(str(base))
    return export_hub_folder(model, NearIDImageProcessor.from_pretrained(base), folder, overwrite=True)


def evaluate_model(model: Path, data: Path, out: Path) -> tuple:
    """NearID SSR/PA and MTG on their test splits, DreamBench++ MH: one Table-1 row; and the retrieval metrics."""
    common = ["--model", str(model), "--cache-dir", str(out / "embedding_cache"), "--batch-size", "64"]
    sources = [arg for name in SOURCES for arg in ("--source", f"{name}={data / name}")]
    nearid = evaluate.main(["nearid", *common, "--positives", str(data / "positives"), *sources,
                            "--split-file", str(data / "splits" / "test.json"), "--output-dir", str(out / "nearid")])
    mtg = evaluate.main(["mtg", *common, "--mtg", str(data / "mtg"), "--split", "test",
                         "--output-dir", str(out / "mtg")])
    dreambench = evaluate.main(["dreambench", *common, "--ratings", str(data / "dreambench" / "ratings"),
                                "--samples", str(data / "dreambench" / "samples"), "--output-dir", str(out / "dreambench")])
    retrieval = evaluate.main(["retrieval", *common, "--positives", str(data / "positives"), *sources,
                               "--split-file", str(data / "splits" / "test.json"),
                               "--val-split-file", str(data / "splits" / "val.json"), "--output-dir", str(out / "retrieval")])
    return tables.table1_row(nearid=nearid["pooled_given"], mtg=mtg, dreambench=dreambench), retrieval


def train_head(base: Path, data: Path, out: Path, epochs: int) -> dict:
    return train.main([
        "--positives", str(data / "positives"), "--source", *(f"{n}={data / n}" for n in SOURCES),
        "--mtg", str(data / "mtg"), "--train-split", str(data / "splits" / "train.json"),
        "--val-split", str(data / "splits" / "val.json"), "--test-split", str(data / "splits" / "test.json"),
        "--base-model", str(base), "--output-dir", str(out), "--overwrite-output-dir",
        "--num-epochs", str(epochs), "--per-device-batch-size", "8", "--learning-rate", "3e-3",
        "--warmup-steps", "20", "--log-steps", "100", "--report-to", "jsonl",
    ])


def run(output_dir: Path, num_identities: int, epochs: int) -> dict:
    from nearid.models import save_siglip_checkpoint

    data = output_dir / "synthetic"
    manifest = synthetic.main(["--output-dir", str(data), "--num-identities", str(num_identities), "--image-size",
                               "64", "--sources", *SOURCES, "--mtg-train", "40", "--mtg-test", "20", "--overwrite"])
    base = save_siglip_checkpoint(output_dir / "small-siglip", SMALL_SIGLIP)
    untrained = export_untrained(base, output_dir / "nearid-untrained")
    before, retrieval_before = evaluate_model(untrained, data, output_dir / "eval-untrained")
    trained = train_head(base, data, output_dir / "training", epochs)
    after, retrieval_after = evaluate_model(Path(trained["release"]), data, output_dir / "eval-trained")
    names = ("NearID head, untrained (= SigLIP MAP head)", f"NearID head, trained {epochs} epochs")
    attention = [heatmaps.mtg_object_attention(scorers.Scorer(str(model)), data / "mtg")
                 for model in (untrained, trained["release"])]
    counts = manifest["counts"]
    text = (f"Synthetic benchmark, Table-1 format: NearID on the test split ({counts['split_test']} of "
            f"{counts['positives']} identities), MTG on its test split ({counts['mtg_test']} rows), DreamBench++ "
            f"on {counts['dreambench_images_per_method']} generations per method:\n\n"
            + tables.table1_markdown(dict(zip(names, (before, after))), nearid_sources=SOURCES)
            + "\nNear-identity retrieval:\n\n"
            + tables.retrieval_markdown(dict(zip(names, (retrieval_before, retrieval_after))))
            + f"\nAttention on the object (share of the head's attention on patches mostly inside the object mask, "
            f"{attention[0]['images']} MTG test views; {100 * attention[0]['object_patches']:.1f}% of patches are "
            f"object): untrained {100 * attention[0]['object_attention']:.1f}%, trained "
            f"{100 * attention[1]['object_attention']:.1f}%")
    result = {"before": before, "after": after, "retrieval": {"before": retrieval_before, "after": retrieval_after},
              "scorers": dict(zip(("before", "after"), names)), "counts": counts, "release": trained["release"],
              "object_attention": {"before": attention[0]["object_attention"],
                                   "after": attention[1]["object_attention"]}}
    # What the demo prints is also kept, so the numbers a reader compares with (the README's) come from a file.
    atomic_write_text(output_dir / "demo_results.md", text + "\n")
    atomic_write_json(output_dir / "demo_results.json", result)
    print("\n" + text)
    print(f"\nRelease folder with model card: {trained['release']}")
    print(f"These tables: {output_dir / 'demo_results.md'}, every number: {output_dir / 'demo_results.json'}")
    return result


@dataclass
class DemoArguments:
    """The main job"""

    output_dir: str = option("demo_outputs", "where data, runs and results are written", folder=True)
    num_identities: int = option(200, "synthetic identities (rows of positives)", min=10)
    epochs: int = option(20, "training epochs of the head", min=1)


def main(argv=None):
    parser = build_parser("demo.py", __doc__, groups=(DemoArguments,))
    _, groups, debug = parse(parser, (DemoArguments,), argv)
    args = groups[DemoArguments]
    with user_errors(debug), cpu_threads(DEMO_THREADS):
        return run(Path(args.output_dir), args.num_identities, args.epochs)


if __name__ == "__main__":
    main()
