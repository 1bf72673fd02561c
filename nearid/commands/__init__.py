"""The command-line programs: `train`, `evaluate`, `search` and `demo`.

Each module has `main(argv=None)`, which returns the run's results to a Python caller. They run as
`python train.py ...` from a clone (the scripts at the repository root call these) and as
`nearid-train ...` once the package is installed (`nearid.commands.console`). `synthetic` writes the
synthetic benchmarks the demo and the tests use; it runs as `python -m nearid.synthetic`.
"""
