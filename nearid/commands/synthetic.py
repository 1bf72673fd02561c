"""Deterministic synthetic NearID benchmarks with exactly the Hub schemas (docs/method.md sections 3 and 4).

Writes the datasets of `nearid.synthetic.builders.build_all` into --output-dir (the layout is in
`nearid.synthetic.builders`) and prints their counts as one JSON line.

Usage: python -m nearid.synthetic --output-dir DIR [--num-identities N] [--seed S] [--image-size PX]
"""

import json
import sys

from nearid.cli import build_parser, parse, user_errors
from nearid.synthetic.builders import SyntheticConfig, build_all


def parse_args(argv=None) -> tuple:
    """(SyntheticConfig, debug) from the command line."""
    parser = build_parser("python -m nearid.synthetic", __doc__.split("\n\n")[0], groups=(SyntheticConfig,))
    _, groups, debug = parse(parser, (SyntheticConfig,), argv)
    return groups[SyntheticConfig], debug


def main(argv=None) -> dict:
    """CLI entry point; returns the manifest (also written to `<output_dir>/manifest.json`)."""
    cfg, debug = parse_args(argv)
    from datasets.utils.logging import disable_progress_bar  # after parsing: --help imports no datasets

    with user_errors(debug):
        disable_progress_bar()  # a few tiny saves; the bars would only clutter the summary line
        manifest = build_all(cfg)
    print(json.dumps({"output_dir": manifest["config"]["output_dir"], **manifest["counts"]}))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
