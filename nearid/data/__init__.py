"""Reading data, one module per job (docs/method.md sections 3 and 4); import the module you need.

- `readers`: a dataset source (Hub id, `save_to_disk` folder, parquet) -> rows; encoded images; MTG masks.
- `nearid_benchmark`: the positives joined with their distractor sources by row index.
- `split_files`: split index files and the published splits of `Aleksandar/NearID`.
- `dreambench_files`: the DreamBench++ samples layout and rating files.
- `score_inputs`: users' generated images and their references (`evaluate.py score`).
"""
