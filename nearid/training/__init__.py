"""Training NearID's pooling head: the library behind `train.py`.

- `inputs`: the training set, the held-out sets (`protocol.nearid_keys` over split rows) and the
  head's input provider (the embed-once token store, or the backbone at every step).
- `loop`: the run state (`Run`), `make_run`, `train_step`, `validate`, `train`.
- `state`: checkpoint save and exact resume, the resume-settings check, the log trimmed to a step.
- `tracking`: the accelerator and its trackers (`jsonl` needs no service).
- `release`: the output folder (`run_outputs.RunOutputs`), the final evaluation, the Hub export and
  push, and `train_results.json` with its provenance.

Nothing is imported here: `train.py --help` loads none of torch, transformers or datasets.
"""
