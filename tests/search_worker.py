"""`search.py index` then `evaluate.py retrieval` in one process launch (one start for both commands):

    python -m torch.distributed.run --nproc_per_node N tests/search_worker.py MODEL GALLERY BENCHMARK OUT
"""

import sys

from nearid.commands import evaluate
from nearid.commands import search


def main(model, gallery, benchmark, out):
    common = ["--model", model, "--device", "cpu", "--batch-size", "3", "--cache-dir", f"{out}/cache"]
    search.main(["index", "--images", gallery, "--index-dir", f"{out}/index", *common])
    evaluate.main(["retrieval", "--positives", f"{benchmark}/positives", "--source", f"flux={benchmark}/flux",
                   "--source", f"sdxl={benchmark}/sdxl", "--split-file", f"{benchmark}/splits/test.json",
                   "--val-split-file", f"{benchmark}/splits/val.json", "--output-dir", f"{out}/retrieval", *common])


if __name__ == "__main__":
    main(*sys.argv[1:])
