"""Shared bits of the benchmark scripts: the environment header and recording the output."""

import datetime
import platform
from pathlib import Path

import torch
import transformers


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment_lines() -> list:
    return [
        f"date: {datetime.date.today().isoformat()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"CPU: {cpu_model()}, torch threads: {torch.get_num_threads()}",
    ]


def write_results(path, lines):
    """Print the lines and record them, so the repo keeps the latest measured output."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
