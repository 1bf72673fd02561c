"""Reports of NearID runs, one module per job; import the module you need.

Everything here writes out what was computed elsewhere (the flat metric dicts of `nearid.metrics`);
nothing computes a metric. Model cards are `nearid.card`'s.

- `results_file`: the results JSON (`provenance`, `results_document`, the short reasons of left-out items).
- `tables`: markdown tables (Table 1, per-source NearID scores, retrieval, MTG, DreamBench++ notes).
- `plots`: PNG plots and contact sheets (matplotlib, imported when a figure is drawn).
- `run_outputs`: `RunOutputs`, the files one run writes into a folder.
"""
