"""Evaluating identity scorers: the library behind `evaluate.py`.

- `protocol`: the evaluation building blocks shared with training's validation, scoring and search:
  embeddings by image key from the embed-once store (`embed_images`), and per benchmark the image
  keys in, the metrics' inputs out.

Nothing is imported here: `evaluate.py --help` loads none of torch, transformers or datasets.
"""
