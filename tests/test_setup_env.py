"""scripts/setup_env.sh installs torch at the security floor: an older torch is upgraded, not kept; the
set-up byte-compiles beside the install and in parallel after it, and only where Python keeps no bytecode.

The script runs against a stand-in environment: its python is the real interpreter with stand-in
`torch` and `transformers` modules of a chosen version, and `-m pip` and `-m compileall` only record
their arguments. scripts/byte_compile.sh itself runs on a folder of a few modules.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, project_requirements

SCRIPT = REPO_ROOT / "scripts" / "setup_env.sh"
BYTE_COMPILE = REPO_ROOT / "scripts" / "byte_compile.sh"


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


def run_setup_steps(tmp_path, torch_version, gpu=False, environment=(), new_venv=False) -> list:
    """Run setup_env.sh with torch `torch_version` already installed and `environment` set (TORCH_INDEX_URL,
    PYTHONDONTWRITEBYTECODE, ...), in a venv that exists or, with `new_venv`, one the script creates;
    returns the pip and compileall calls it ran, in order, each as "pip ARGS" or "compileall ARGS", and those of
    the Python that makes the venv as "base-venv ARGS" or "base-pip ARGS"."""
    modules, tools, venv = tmp_path / "modules", tmp_path / "tools", tmp_path / "venv"
    for name, version in (("torch", torch_version), ("transformers", "5.18.0")):
        (modules / name).mkdir(parents=True)
        (modules / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
        (modules / f"{name}-{version}.dist-info").mkdir()
        (modules / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
    log = tmp_path / "steps.log"
    tools.mkdir()
    python = tools / "venv-python"
    # FAIL_PIP_UPGRADE: the pip upgrade fails, as where no current pip can be had.
    # SLOW_PIP: the requirements install runs until it is stopped, its process id in pip.pid.
    python.write_text(f"#!/bin/bash\nif [ \"$1\" = -m ] && [[ \"$2\" =~ ^(pip|compileall|ensurepip)$ ]]; then echo \"${{@:2}}\" >> {log}; "
                      f"[[ -n \"$SLOW_PIP\" && \"$2\" == pip && \"$*\" == *requirements* ]] && echo $$ > {tmp_path}/pip.pid && exec /bin/sleep 600; "
                      f"[[ -n \"$FAIL_PIP_UPGRADE\" && \"$2\" == pip && \"$*\" == *--upgrade* ]] && exit 1; "
                      f"[[ -n \"$FAIL_ENSUREPIP\" && \"$2\" == ensurepip ]] && exit 1; "
                      f"exit 0; fi\nPYTHONPATH={modules} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    # The stand-in for the Python that creates the venv: `-m venv [OPTION] DIR` puts the stand-in python in DIR;
    # its `-m pip` (the base Python's pip) only records its arguments, and fails with FAIL_BASE_PIP.
    (tools / "python3").write_text(f"#!/bin/bash\nPATH=/usr/bin:/bin\necho \"base-${{2}} ${{@:3}}\" >> {log}\n"
                                   f"[ \"$1 $2\" = \"-m venv\" ] && mkdir -p \"${{@: -1}}/bin\" && cp {python} \"${{@: -1}}/bin/python\"\n"
                                   f"[ \"$1 $2\" = \"-m pip\" ] && [ -n \"$FAIL_BASE_PIP\" ] && exit 1\nexit 0\n")
    (tools / "python3").chmod(0o755)
    for tool in ("dirname", "rm"):  # how the script finds the others; what removes a venv left half made
        (tools / tool).symlink_to(shutil.which(tool))
    if not new_venv:
        (venv / "bin").mkdir(parents=True)
        shutil.copy(python, venv / "bin" / "python")
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/bash\nexit 0\n")
        (tools / "nvidia-smi").chmod(0o755)
    # PATH holds only these tools: whether nvidia-smi exists is the test's choice.
    env = {"PATH": str(tools), "VENV": str(venv), "PYTHON": str(tools / "python3"), **dict(environment)}
    if environment and "SLOW_PIP" in dict(environment):
        # Ctrl-C as in a terminal: a pytest-xdist worker ignores it, and a shell cannot trap what it inherits ignored.
        return subprocess.Popen(["/bin/bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    subprocess.run(["/bin/bash", str(SCRIPT)], cwd=REPO_ROOT, check=True, capture_output=True, text=True, env=env)
    return log.read_text().splitlines()


def run_setup(tmp_path, torch_version, gpu=False, environment=()) -> list:
    """The pip installs that setup_env.sh ran (run_setup_steps), their arguments only."""
    steps = run_setup_steps(tmp_path, torch_version, gpu, environment)
    return [step.removeprefix("pip ") for step in steps if step.startswith("pip ")]


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


def test_a_new_venv_gets_the_current_pip_before_anything_else(tmp_path):
    # The pip a Python was released with resolves the requirements with about twice the CPU time. The base
    # Python's pip installs the current one into a venv made without pip.
    steps = run_setup_steps(tmp_path, "2.4.0+cpu", new_venv=True)
    venv_python = tmp_path / "venv" / "bin" / "python"
    assert venv_python.exists()
    assert steps[0] == f"base-venv --without-pip {tmp_path / 'venv'}"
    assert steps[1].split()[:3] == ["base-pip", "--python", str(venv_python)]
    assert steps[1].split()[-1] == "pip>=25,<27" and "--no-compile" in steps[1].split()
    assert steps[2].endswith("torch==2.13.0 -r requirements.txt")


def test_without_the_base_pythons_pip_the_venv_upgrades_its_bundled_one(tmp_path):
    steps = run_setup_steps(tmp_path, "2.4.0+cpu", new_venv=True, environment={"FAIL_BASE_PIP": "1"})
    assert [step.split()[0] for step in steps[:4]] == ["base-venv", "base-pip", "ensurepip", "pip"]
    assert steps[3].split()[-2:] == ["--upgrade", "pip>=25,<27"]
    assert steps[4].endswith("torch==2.13.0 -r requirements.txt")


def test_a_venv_that_cannot_be_made_whole_is_removed(tmp_path):
    # Its python would otherwise pass for a made venv at the next set-up, which would then have no pip.
    with pytest.raises(subprocess.CalledProcessError):
        run_setup_steps(tmp_path, "2.4.0+cpu", new_venv=True, environment={"FAIL_BASE_PIP": "1", "FAIL_ENSUREPIP": "1"})
    assert not (tmp_path / "venv").exists()


def test_a_pip_that_cannot_be_upgraded_leaves_the_venvs_own_to_do_the_set_up(tmp_path):
    steps = run_setup_steps(tmp_path, "2.4.0+cpu", new_venv=True,
                            environment={"FAIL_BASE_PIP": "1", "FAIL_PIP_UPGRADE": "1"})
    upgrade = next(i for i, step in enumerate(steps) if step.startswith("pip ") and "--upgrade" in step)
    assert any(step.endswith("torch==2.13.0 -r requirements.txt") for step in steps[upgrade + 1:])


def test_an_existing_venv_keeps_its_pip(tmp_path):
    assert not any("--upgrade" in step.split() for step in run_setup_steps(tmp_path, "2.4.0+cpu"))


@pytest.mark.parametrize("torch_version, environment", [
    ("2.4.0+cpu", {}), ("2.4.0+cpu", {"TORCH_INDEX_URL": "https://example.org"}), ("2.12.1+cpu", {}),
    ("2.4.0+cpu", {"PYTHONDONTWRITEBYTECODE": "1"}),
    ("2.4.0+cpu", {"PYTHONDONTWRITEBYTECODE": "1", "TORCH_INDEX_URL": "https://example.org"})])
def test_no_install_byte_compiles_what_it_installs(tmp_path, torch_version, environment):
    # pip compiles in one process, after each install; Python compiles a module when it is first imported,
    # and byte_compile.sh compiles on every core where Python keeps no bytecode.
    installs = run_setup(tmp_path, torch_version, environment=environment)
    assert installs and all("--no-compile" in install.split() for install in installs)


def test_the_environment_is_byte_compiled_after_its_installs_where_python_keeps_no_bytecode(tmp_path):
    # With PYTHONDONTWRITEBYTECODE, every interpreter would compile what it imports again.
    steps = run_setup_steps(tmp_path, "2.4.0+cpu", environment={"PYTHONDONTWRITEBYTECODE": "1",
                                                                 "TORCH_INDEX_URL": "https://example.org"})
    assert [step.split()[0] for step in steps] == ["pip", "pip", "compileall"]
    site_packages = subprocess.run([tmp_path / "venv" / "bin" / "python", "-c", "import sysconfig; print(*sorted("
                                    "{sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}))"],
                                   check=True, capture_output=True, text=True).stdout.split()
    compileall = steps[-1].split()
    assert compileall[:4] == ["compileall", "-qq", "-j0", "-x"] and compileall[5:] == site_packages


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopping_the_set_up_stops_the_install_beside_it(tmp_path, stop, status):
    # pip runs in the background, where a script's Ctrl-C does not reach it: the set-up stops it itself.
    setup = run_setup_steps(tmp_path, "2.4.0+cpu", environment={"SLOW_PIP": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    pid_file = tmp_path / "pip.pid"
    try:
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        pip = int(pid_file.read_text())
        setup.send_signal(stop)
        assert setup.wait(timeout=30) == status
    finally:
        setup.kill()
    for _ in range(100):  # the install's process is gone (or a zombie, left for the system to reap)
        try:
            if Path(f"/proc/{pip}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pip, signal.SIGKILL)
        pytest.fail("the install went on after the set-up was stopped")


def test_the_environment_is_left_to_compile_on_import_where_python_keeps_bytecode(tmp_path):
    steps = run_setup_steps(tmp_path, "2.4.0+cpu")
    assert steps and not any(step.startswith("compileall") for step in steps)


def write_modules(folder) -> dict:
    """A package of two modules, one inside a subpackage, and a file that does not compile; returns the
    sources that compile, each with the bytecode file Python would look for."""
    (folder / "package" / "inner").mkdir(parents=True)
    sources = [folder / "package" / "__init__.py", folder / "package" / "inner" / "module.py"]
    for index, source in enumerate(sources):
        source.write_text(f"VALUE = {index}\n")
    (folder / "package" / "template.py").write_text("def {{ name }}():\n")
    return {source: Path(importlib.util.cache_from_source(str(source))) for source in sources}


def byte_compile(folder, **environment) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"} | environment
    return subprocess.run(["bash", str(BYTE_COMPILE), sys.executable, str(folder)], env=env, capture_output=True,
                          text=True)


def test_byte_compile_writes_the_bytecode_pip_would_where_python_keeps_none(tmp_path):
    compiled = write_modules(tmp_path)
    result = byte_compile(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    # A file that does not compile is skipped, as pip skips it: no error, no bytecode.
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "package" / "__pycache__").glob("template.*"))
    for source, bytecode in compiled.items():
        header = bytecode.read_bytes()[:16]
        # The mode pip writes: checked against the source's modification time and size, not a hash.
        assert header[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(header[4:8], "little") == 0
        assert int.from_bytes(header[8:12], "little") == int(source.stat().st_mtime)
        assert int.from_bytes(header[12:16], "little") == source.stat().st_size


@pytest.mark.parametrize("where", ["site", "tests/site"])
def test_byte_compile_leaves_out_what_nearid_never_imports(tmp_path, where):
    # Test folders and transformers' other model families are left to import; the families NearID loads and
    # what transformers itself imports are compiled. A folder named tests above the one compiled changes nothing.
    folder, compiled, left_out = tmp_path / where, [], []
    for relative, wanted in (("pandas/tests/test_frame.py", left_out), ("scipy/linalg/test/test_x.py", left_out),
                             ("transformers/models/bert/modeling_bert.py", left_out),
                             ("transformers/models/siglip2_extra/modeling.py", left_out),
                             ("transformers/models/__init__.py", compiled),
                             ("transformers/models/siglip/modeling_siglip.py", compiled),
                             ("transformers/models/siglip2/modeling_siglip2.py", compiled),
                             ("transformers/models/auto/modeling_auto.py", compiled),
                             ("transformers/models/dinov3_vit/modeling_dinov3_vit.py", compiled),
                             ("transformers/models/clip/modeling_clip.py", compiled),
                             ("transformers/testing_utils.py", compiled), ("numpy/testing/utils.py", compiled)):
        source = folder / relative
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("VALUE = 1\n")
        wanted.append(Path(importlib.util.cache_from_source(str(source))))
    assert byte_compile(folder, PYTHONDONTWRITEBYTECODE="1").returncode == 0
    assert [path for path in compiled if not path.exists()] == [] and [path for path in left_out if path.exists()] == []


def test_byte_compile_beside_an_install_compiles_each_package_pip_has_finished_while_it_runs(tmp_path):
    """A package the install adds counts as finished once its RECORD is written (pip writes it last). One without
    a RECORD yet, what a RECORD leaves out, and a package that was there before the install (pip may be replacing
    it) are left to the pass after the install. The call returns once the install has ended."""
    site = tmp_path / "site"

    def add_package(name, record=True, listed=("__init__.py",)):
        (site / name).mkdir(parents=True)
        for module in ("__init__.py", "not_listed.py"):
            (site / name / module).write_text("VALUE = 1\n")
        if record:
            (site / f"{name}-1.0.dist-info").mkdir()
            (site / f"{name}-1.0.dist-info" / "RECORD").write_text(
                "".join(f"{name}/{module},sha256=x,10\n" for module in listed) + f"{name}-1.0.dist-info/RECORD,,\n")

    add_package("was_there")
    install = subprocess.Popen(["sleep", "120"])  # the stand-in for pip, running until the checks are done
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    beside = subprocess.Popen(["bash", str(BYTE_COMPILE), "--beside", str(install.pid), sys.executable, str(site)],
                              env=env)
    bytecode = {path: Path(importlib.util.cache_from_source(str(site / path)))
                for path in ("was_there/__init__.py", "added/__init__.py", "added/not_listed.py",
                             "still_writing/__init__.py")}
    try:
        time.sleep(3)  # the first look, which finds was_there, is over
        add_package("still_writing", record=False)
        add_package("added")
        for _ in range(600):
            if bytecode["added/__init__.py"].exists():
                break
            time.sleep(0.1)
        assert beside.poll() is None and bytecode["added/__init__.py"].exists()  # while the install runs
        assert [path for path, pyc in bytecode.items() if pyc.exists()] == ["added/__init__.py"]
    finally:
        install.terminate()
        install.wait()
    assert beside.wait(timeout=30) == 0  # returns once the install has ended
    assert byte_compile(site, PYTHONDONTWRITEBYTECODE="1").returncode == 0  # the pass after it: the rest
    assert all(path.exists() for path in bytecode.values())


def test_byte_compile_leaves_compiling_to_import_where_python_keeps_bytecode(tmp_path):
    write_modules(tmp_path)
    assert byte_compile(tmp_path).returncode == 0
    assert not list(tmp_path.rglob("*.pyc"))


def test_byte_compile_fails_where_the_compiler_cannot_run(tmp_path):
    # Only "some file did not compile" is let through; a missing folder argument or interpreter is an error.
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    missing = subprocess.run(["bash", str(BYTE_COMPILE), str(tmp_path / "no-python"), str(tmp_path)], env=env,
                             capture_output=True, text=True)
    no_folder = subprocess.run(["bash", str(BYTE_COMPILE), sys.executable], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and no_folder.returncode != 0 and "usage" in no_folder.stderr


def make_dry_run(tmp_path, target, **environment) -> list:
    """The commands `make TARGET` would run (a dry run) with a venv that has its python and nothing else, each
    split; TARGET "oldest" is the oldest-transformers folder's install."""
    venv, oldest = tmp_path / "venv", tmp_path / "oldest"
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONDONTWRITEBYTECODE", "MAKEFLAGS")}
    recipe = subprocess.run(["make", "--dry-run", "--old-file", f"{venv}/bin/python", f"VENV={venv}", f"OLDEST_DIR={oldest}",
                             f"{oldest}/.ready" if target == "oldest" else target], cwd=REPO_ROOT,
                            env=env | environment, check=True, capture_output=True, text=True).stdout
    return [line.split() for line in recipe.splitlines() if not line.startswith("#")]


def oldest_transformers_recipe(tmp_path, **environment) -> list:
    """The commands of the Makefile's install of the oldest transformers, each split."""
    return make_dry_run(tmp_path, "oldest", **environment)


def test_the_oldest_transformers_installs_beside_the_requirements(tmp_path):
    # The folder needs the venv's pip, not its requirements: `make test` installs both at once.
    assert not any("scripts/setup_env.sh" in command for command in oldest_transformers_recipe(tmp_path))
    [set_up] = [command for command in make_dry_run(tmp_path, "test") if "--jobs=2" in command]
    assert set_up[-1] == "set-up"
    installs = make_dry_run(tmp_path, "set-up")
    assert any("scripts/setup_env.sh" in command for command in installs)
    assert any("--target" in command for command in installs)


def test_the_oldest_transformers_tested_is_the_floor_of_pyproject(tmp_path):
    # `make test-oldest-transformers` tests the lowest release pyproject.toml allows, not an older or newer one.
    [requirement] = [arg for command in oldest_transformers_recipe(tmp_path) for arg in command
                     if arg.startswith('"transformers')]
    oldest = tuple(int(part) for part in re.fullmatch(r'"transformers\[kernels\]==([\d.]+)"', requirement)[1].split("."))
    assert oldest[:2] == floor("transformers")


@pytest.mark.parametrize("environment", [{}, {"PYTHONDONTWRITEBYTECODE": "1"}])
def test_the_oldest_transformers_is_byte_compiled_as_the_venv_is(tmp_path, environment):
    # pip installs without compiling; byte_compile.sh then compiles the folder where Python keeps no bytecode.
    recipe = oldest_transformers_recipe(tmp_path, **environment)
    [install] = [command for command in recipe if "install" in command]
    assert "--no-compile" in install and install[install.index("--target") + 1] == str(tmp_path / "oldest")
    [compile_command] = [command for command in recipe if command[-3:-2] == ["scripts/byte_compile.sh"]]
    assert compile_command[-1] == str(tmp_path / "oldest")
