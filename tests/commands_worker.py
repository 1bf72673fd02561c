"""`evaluate.py nearid`, `search.py index` and `evaluate.py retrieval` in one process launch (one start for the
three commands), each writing into its own folders under OUT, then the nearid run that a corrupt image stops:

    python -m torch.distributed.run --nproc_per_node N tests/commands_worker.py MODEL BENCHMARK SDXL GALLERY OUT

BENCHMARK is a synthetic benchmark folder (conftest.py's `synthetic`); SDXL a copy of its sdxl source with one
image corrupt, which the first nearid run skips. GALLERY is a folder of images to index. The first nearid run
comes first, so it starts in a fresh process as `evaluate.py` does. The last run (`stopped_by_corrupt_image`:
no --skip-bad-images, a cache and output folder of its own) ends every process with the command's error and
exit status 1, so a launched process that exits otherwise, or earlier, is seen.
"""

import sys

from nearid.commands import evaluate
from nearid.commands import search


def nearid_args(model, benchmark, sdxl, out, cache, *extra):
    """evaluate.py's arguments for the NearID benchmark on `benchmark`'s positives and flux, and `sdxl`."""
    args = ["nearid", "--model", model, "--positives", f"{benchmark}/positives", "--source", f"flux={benchmark}/flux",
            "--source", f"sdxl={sdxl}", "--device", "cpu", "--batch-size", "4", "--output-dir", out,
            "--cache-dir", cache, *extra]
    return [str(arg) for arg in args]


def main(model, benchmark, sdxl, gallery, out):
    """The three commands that succeed."""
    evaluate.main(nearid_args(model, benchmark, sdxl, f"{out}/nearid", f"{out}/nearid_cache", "--skip-bad-images"))
    common = ["--model", model, "--device", "cpu", "--batch-size", "3", "--cache-dir", f"{out}/cache"]
    search.main(["index", "--images", gallery, "--index-dir", f"{out}/index", *common])
    evaluate.main(["retrieval", "--positives", f"{benchmark}/positives", "--source", f"flux={benchmark}/flux",
                   "--source", f"sdxl={benchmark}/sdxl", "--split-file", f"{benchmark}/splits/test.json",
                   "--val-split-file", f"{benchmark}/splits/val.json", "--output-dir", f"{out}/retrieval", *common])


def stopped_by_corrupt_image(model, benchmark, sdxl, out):
    """`evaluate.py nearid` without --skip-bad-images on `sdxl`: SystemExit(1) after the error message."""
    evaluate.main(nearid_args(model, benchmark, sdxl, f"{out}/stopped", f"{out}/stopped_cache"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    model, benchmark, sdxl, _, out = sys.argv[1:]
    stopped_by_corrupt_image(model, benchmark, sdxl, out)
