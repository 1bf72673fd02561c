"""Deterministic synthetic NearID benchmarks with exactly the Hub schemas (docs/method.md sections 3 and 4).

Tests, the demo, evaluation and training smoke runs need data shaped like the real Hub datasets
(`Aleksandar/NearID`, `Aleksandar/NearID-<Source>`, `abdo-eldesokey/mtg-dataset`, DreamBench++)
without a network. This package draws it with PIL in a few seconds; import the module you need:

- `drawing`: identities as procedural objects, their views, near-identity distractors and MTG part edits.
- `builders`: the datasets (`build_benchmark`, `build_mtg`, `build_dreambench`) and `build_all`, which
  writes them all with splits, a manifest and a README.

The command is `python -m nearid.synthetic --output-dir DIR` (`nearid.commands.synthetic`).
"""
