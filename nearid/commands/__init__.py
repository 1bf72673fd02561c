"""The command-line programs: `train`, `evaluate`, `search` and `demo`.

Each module has `main(argv=None)`. They run as `python train.py ...` from a clone (the scripts at the
repository root call these) and as `nearid-train ...` once the package is installed.
"""
