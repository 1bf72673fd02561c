"""Evaluating identity scorers: the library behind `evaluate.py`.

- `protocol`: the evaluation building blocks shared with training's validation, scoring and search:
  embeddings by image key from the embed-once store (`embed_images`), and per benchmark the image
  keys in, the metrics' inputs out.
- One module per mode, each with `run(args, state)` (the run, on every process of a launch) and
  `write_outputs` (its folder: tables, CSV, plots, the results JSON last): `nearid_benchmark`,
  `retrieval`, `mtg`, `dreambench`, `score`, and `table1` (which runs nearid, mtg and dreambench).
- `records`: the results document with its provenance, and the headline metrics in a model card's
  model-index (`--model-index`).

`args` is the command's namespace of argument groups (`nearid.options.Arguments`); embedding the
run's images and opening its output folder are `nearid.options.embed` and `open_outputs`.
Nothing is imported here: `evaluate.py --help` loads none of torch, transformers or datasets.
"""
