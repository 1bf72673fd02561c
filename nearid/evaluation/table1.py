"""Every Table-1 benchmark for one model (`evaluate.py table1`): the nearid, mtg and dreambench modes,
each into its own folder, then the model's row beside the paper's."""

from __future__ import annotations

from pathlib import Path

from nearid.cli import DatasetSource, named_sources
from nearid.data import readers, split_files
from nearid.evaluation import dreambench, mtg, nearid_benchmark, protocol
from nearid.io import atomic_write_text
from nearid.options import open_outputs
from nearid.reports import tables


def run(args, state, modes: dict):
    """The nearid, mtg and (when `modes` holds it) dreambench modes for one model, each run with its arguments
    in `modes` (its own folder under --output-dir), then its Table-1 row beside the paper's."""
    nearid = nearid_benchmark.run(modes["nearid"], state)
    mtg_scores = mtg.run(modes["mtg"], state)
    dreambench_result = dreambench.run(modes["dreambench"], state) if "dreambench" in modes else None
    if not state.is_main_process:
        return None
    headline = protocol.nearid_headline(nearid)
    row = tables.table1_row(nearid=headline, mtg=mtg_scores, dreambench=dreambench_result)
    write_outputs(args, row, list(named_sources(args.source)))
    return row


def write_outputs(args, row, sources):
    outputs = open_outputs(args, "evaluate.py")
    origin = table1_data_origin(args)
    rows = {f"{args.model} (this run, {origin})": row,
            **{name: dict(zip((k for _, k, _ in tables.TABLE1_COLUMNS), values))
               for name, values in tables.PAPER_TABLE1.items()}}
    table = tables.table1_markdown(rows, nearid_sources=sources)
    notes = [f"Data: this run's row is on {origin}; the (paper) rows are the paper's Table 1 on the published "
             "benchmarks." + (" Synthetic data (written by nearid.synthetic) shows that the pipeline runs; its "
                              "numbers say nothing about the published benchmarks." if "synthetic" in origin else ""),
             "NearID columns: " + nearid_rows_note(args.split_file),
             "DB++ column: " + ("the object category of the DreamBench++ samples scored here." if args.samples else
                                "not evaluated (give --ratings and --samples).")]
    text = table + "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    atomic_write_text(outputs.path("table1.md"), text)
    outputs.finish({"benchmark": "table1", "model": args.model, "row": row, "notes": notes,
                    "outputs": {name: str(Path(args.output_dir) / name) for name in ("nearid", "mtg", "dreambench")}})
    print(text)


def nearid_rows_note(split_file) -> str:
    """Which NearID rows a Table-1 row was computed on, and whether that is comparable to the paper."""
    if split_file and Path(split_file).resolve() == split_files.published_split_file("test").resolve():
        return "the authors' published test split (500 rows), as in the paper."
    if split_file:
        return f"the rows of {split_file}."
    return ("every row of the positives (no --split-file), which is not the paper's test split: these numbers are "
            "not comparable to the paper's.")


def table1_data_origin(args) -> str:
    """"synthetic data", "local data", "Hub data" or a mix ("synthetic data + Hub data"): where the row's data came
    from, so a row on other data is never read as one on the paper's benchmarks."""
    used = [args.positives, *named_sources(args.source).values(), args.mtg] + ([args.samples] if args.samples else [])
    origins = {readers.data_origin(DatasetSource.parse(str(source)).location) for source in used}
    return " + ".join(f"{'Hub' if origin == 'hub' else origin} data"
                      for origin in ("synthetic", "local", "hub") if origin in origins)
