"""A training run's outputs: the folder, the final held-out evaluation, the Hub export and push, and
`train_results.json` (with the provenance block every evaluate result has)."""

from __future__ import annotations

import warnings
from pathlib import Path

from nearid import card
from nearid.evaluation import protocol
from nearid.reports import plots, results_file, run_outputs
from nearid.training.loop import validate

RESULTS = "train_results.json"
# What every run writes into OUTPUT_DIR besides its results, even one stopped before its end (the token
# store, reusable by later runs, is not among them).
RUN_OUTPUTS = ("checkpoints", "logs.jsonl", "train_args.json", "release", "training_loss.png")
# The outputs a new run must not delete unasked: they hold hours of work.
WORK = ("checkpoints", RESULTS, "release")


def open_outputs(args, accelerator):
    """Never mix runs: a run with work to lose (checkpoints, results, a release) is resumed, or removed with
    --overwrite-output-dir; a fresh start removes every earlier output before it writes its own."""
    out = Path(args.output_dir)
    work = [name for name in WORK if (out / name).exists()]
    if work and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise FileExistsError(f"{out} already holds a training run ({', '.join(work)}). Continue it with "
                              "--resume-from-checkpoint latest, choose another --output-dir, or pass "
                              "--overwrite-output-dir to start afresh.")
    out.mkdir(parents=True, exist_ok=True)
    # All of the old run goes before the new one writes anything, so a crash can never leave old results
    # beside the new run's files; one process removes them.
    keep = bool(args.resume_from_checkpoint) or not accelerator.is_main_process
    outputs = run_outputs.RunOutputs(out, RESULTS, always=RUN_OUTPUTS, keep_previous=keep)
    accelerator.wait_for_everyone()
    return outputs


def export(run, processor, base, all_args, final, provenance):
    """The release folder: a complete Hub repo with its model card; returns (folder, what the card lacks).

    base: the `ResolvedModel` training started from; the card names it and the commit it was at.
    final: (split, scores of `validate`) or None. provenance: {"positives": ..., <source>: ..., "mtg": ...}
    as `inputs.load_data` recorded them; the card names a dataset by Hub id only when it was read from
    the Hub at a recorded revision. The card's numbers are the headline `evaluate.py --model-index`
    records (`protocol.nearid_headline`).
    """
    from nearid.hub import export_hub_folder

    args = run.args
    split, scores = final if final else (None, None)
    evaluated = [p for name, p in provenance.items() if name != "mtg"]  # the final evaluation's data
    headline = protocol.nearid_headline(scores) if scores else None
    results = card.benchmark_results("nearid", headline, split, evaluated) if headline else None
    model_card = {"repo_id": args.push_to_hub, "base_model": base.name, "base_model_commit": base.commit,
                  "datasets": list(provenance.values()), "training_args": all_args, "results": results,
                  "model_name": args.push_to_hub or f"nearid-{Path(args.output_dir).resolve().name}"}
    lacks = card.card_warnings(base.name, model_card["datasets"], results)
    with warnings.catch_warnings():  # said once by the caller, in this program's own words
        warnings.simplefilter("ignore", card.CardWarning)
        folder = export_hub_folder(run.model, processor, Path(args.output_dir) / "release", overwrite=True,
                                   model_card=model_card)
    print(f"exported {folder}")
    return folder, lacks


def push(args, folder):
    """Upload the release folder in one commit; a failure leaves it intact and says how to retry."""
    from nearid.hub import push_to_hub

    url = push_to_hub(folder, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                      commit_message=args.hub_commit_message or "Upload NearID trained with train.py")
    print(f"pushed to {url}")
    return url


def finish(run, outputs, processor, base, all_args, skipped, describe):
    """Final held-out evaluation (test if given, else val), export, loss plot, results file, then the push."""
    final_split = "test" if "test" in run.held_out else ("val" if "val" in run.held_out else None)
    scores = validate(run, final_split) if final_split else None
    if not run.accelerator.is_main_process:
        return None
    args = run.args
    results = {"global_step": run.global_step, "final_split": final_split, "final": scores,
               "history": run.history["validation"], "loss": run.history["loss"], "skipped_images": skipped,
               "data": describe, "arguments": all_args,
               "provenance": run_provenance(base, args, all_args, describe["datasets"], final_split)}
    folder = None
    if args.export:
        folder, lacks = export(run, processor, base, all_args,
                               (final_split, scores) if scores else None, describe["datasets"])
        for lack in lacks:
            outputs.warn(f"model card: {lack}")
    results["release"] = str(folder) if folder else None
    outputs.optional("plotting training_loss.png", plots.plot_training_loss, outputs.path("training_loss.png"),
                     run.history, base.name)
    outputs.finish(results)  # written before the upload: a failed push loses nothing
    if args.push_to_hub:
        results["pushed"] = push(args, folder)
        outputs.finish(results)
    return {**results, "files": list(dict.fromkeys(outputs.files)), "warnings": list(outputs.warnings)}


def run_provenance(base, args, all_args, datasets, final_split):
    """`results_file.provenance` of a training run: the base model (Hub id or folder, revision, the commit it resolved
    to), every dataset, the final split's file."""
    split_file = {"test": all_args.get("test_split"), "val": all_args.get("val_split")}.get(final_split)
    model = {**base.provenance(), "mixed_precision": args.mixed_precision}
    return results_file.provenance(model, list(datasets.values()), split_file,
                                   extra={"num_processes": all_args.get("num_processes")})
