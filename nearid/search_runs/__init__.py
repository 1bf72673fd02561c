"""Identity search over your images: the library behind `search.py`.

One module per command, each with `run(args, state)` (the run, on every process of a launch):
- `index`: embed a gallery of files, folders or a dataset column into a search index, or bring one up to date;
- `query`: the top-k gallery images of query images, with `write_outputs` (CSV, contact sheet, results JSON last);
- `cluster`: the gallery grouped by identity and its near-duplicates, with `write_outputs` (CSV, a contact sheet
  per large cluster, results JSON last).

The index itself and its searches are `nearid.search`; what a person reads of them (records, console
summaries, contact sheets) is `nearid.search_reports`. `args` is the command's namespace of argument
groups (`nearid.options.Arguments`); the query and index embedder and the output folder are
`nearid.options.embedder` and `open_outputs`. Nothing is imported here: `search.py --help` loads none of
torch, transformers, datasets or faiss.
"""
