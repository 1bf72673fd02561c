"""scripts/setup_env.sh installs torch at the security floor: an older torch is upgraded, not kept.

The script runs against a stand-in environment: its python is the real interpreter with stand-in
`torch` and `transformers` modules of a chosen version, and `-m pip` only records its arguments.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, project_requirements

SCRIPT = REPO_ROOT / "scripts" / "setup_env.sh"


def floor(package) -> tuple:
    """The version floor pyproject.toml gives `package`."""
    match = re.search(r">=([\d.]+)", project_requirements().get(package, ""))
    assert match, f"pyproject.toml has no floor for {package}"
    return tuple(int(part) for part in match[1].split("."))


def test_requirements_exclude_the_releases_with_known_advisories():
    assert floor("torch") >= (2, 10)  # CVE-2026-24747, the weights_only unpickler
    assert floor("pillow") >= (10, 3)  # CVE-2024-28219
    assert floor("transformers") >= (5, 10)  # CVE-2026-4372, CVE-2026-9856


def test_transformers_floor_loads_auto_image_processor_without_torchvision():
    # 5.4 to 5.17 mark AutoImageProcessor as needing torchvision, which the set-up keeps out (pyproject.toml).
    assert floor("transformers") >= (5, 18)


def run_setup(tmp_path, torch_version, gpu=False, environment=()) -> list:
    """Run setup_env.sh with torch `torch_version` already installed and `environment` set (TORCH_INDEX_URL,
    PYTHONDONTWRITEBYTECODE, ...); returns the pip installs it ran."""
    modules, tools, venv = tmp_path / "modules", tmp_path / "tools", tmp_path / "venv"
    for name, version in (("torch", torch_version), ("transformers", "5.18.0")):
        (modules / name).mkdir(parents=True)
        (modules / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    log = tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/bash\nif [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo \"${{@:3}}\" >> {log}; exit 0; fi\n"
                      f"PYTHONPATH={modules} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    tools.mkdir()
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/bash\nexit 0\n")
        (tools / "nvidia-smi").chmod(0o755)
    # PATH holds only the stand-in tools: whether nvidia-smi exists is the test's choice.
    env = {"PATH": str(tools), "VENV": str(venv), **dict(environment)}
    subprocess.run(["/bin/bash", str(SCRIPT)], cwd=REPO_ROOT, check=True, capture_output=True, text=True, env=env)
    return log.read_text().splitlines()


@pytest.mark.parametrize("gpu, wanted", [(False, "torch==2.13.0"), (True, "torch>=2.10")])
def test_a_torch_below_the_floor_is_upgraded_in_the_requirements_install(tmp_path, gpu, wanted):
    # One pip call names the torch build and the requirements: one resolution and one install pass.
    [install] = run_setup(tmp_path, "2.4.0+cpu", gpu)
    assert install.endswith(f"{wanted} -r requirements.txt")


def test_a_torch_index_gets_a_pip_call_of_its_own(tmp_path):
    # The index serves torch only: the requirements come from the usual indexes, without torch named.
    index = "https://download.pytorch.org/whl/cpu"
    torch_install, requirements_install = run_setup(tmp_path, "2.4.0+cpu", environment={"TORCH_INDEX_URL": index})
    assert torch_install.endswith(f"torch>=2.10 --index-url {index}")
    assert "torch" not in requirements_install and requirements_install.endswith("-r requirements.txt")


def test_a_torch_at_the_floor_is_kept(tmp_path):
    [install] = run_setup(tmp_path, "2.12.1+cpu")
    assert "torch" not in install and install.endswith("-r requirements.txt")


@pytest.mark.parametrize("torch_version, torch_index_url", [("2.4.0+cpu", None), ("2.4.0+cpu", "https://example.org"),
                                                            ("2.12.1+cpu", None)])
def test_no_install_byte_compiles_what_it_installs(tmp_path, torch_version, torch_index_url):
    # Python compiles a module when it is first imported; pip would compile all of them (most never run).
    environment = {"TORCH_INDEX_URL": torch_index_url} if torch_index_url else {}
    installs = run_setup(tmp_path, torch_version, environment=environment)
    assert installs and all("--no-compile" in install.split() for install in installs)


def test_installs_byte_compile_where_python_keeps_no_bytecode(tmp_path):
    # With PYTHONDONTWRITEBYTECODE, every interpreter would compile what it imports again.
    installs = run_setup(tmp_path, "2.4.0+cpu", environment={"PYTHONDONTWRITEBYTECODE": "1"})
    assert installs and not any("--no-compile" in install.split() for install in installs)


def oldest_transformers_install(tmp_path, **environment) -> list:
    """The arguments of the Makefile's pip install of the oldest transformers (a dry run of make)."""
    venv, oldest = tmp_path / "venv", tmp_path / "oldest"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"} | environment
    recipe = subprocess.run(["make", "--dry-run", "--old-file", f"{venv}/.ready", f"VENV={venv}", f"OLDEST_DIR={oldest}",
                             f"{oldest}/.ready"], cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                            text=True).stdout
    [install] = [line for line in recipe.splitlines() if " pip install " in line]
    assert f"--target {oldest}" in install
    return install.split()


def test_the_oldest_transformers_tested_is_the_floor_of_pyproject(tmp_path):
    # `make test-oldest-transformers` tests the lowest release pyproject.toml allows, not an older or newer one.
    [requirement] = [arg for arg in oldest_transformers_install(tmp_path) if arg.startswith('"transformers')]
    oldest = tuple(int(part) for part in re.fullmatch(r'"transformers\[kernels\]==([\d.]+)"', requirement)[1].split("."))
    assert oldest[:2] == floor("transformers")


def test_the_oldest_transformers_install_does_not_byte_compile(tmp_path):
    # Only two test files import it, and they import a small part of it.
    assert "--no-compile" in oldest_transformers_install(tmp_path)
    assert "--no-compile" not in oldest_transformers_install(tmp_path, PYTHONDONTWRITEBYTECODE="1")
