"""A newcomer's path (the README's first two commands on a fresh machine): one lock file, constraints.txt,
that every install command uses; metadata.json's versions are the locked ones; the README's test command is
exactly what .ci/run runs, and it makes the MONAI Label environment itself (or finds it up to date); the install
puts no top-level ``scripts`` into site-packages, and ``surgical-sam`` runs the bundle of the folder it is called
from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK_FILE = os.path.join(REPO_ROOT, "constraints.txt")


def read(*parts: str) -> str:
    with open(os.path.join(REPO_ROOT, *parts)) as handle:
        return handle.read()


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): case and runs of ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of constraints.txt."""
    pins = {}
    for line in read("constraints.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        assert canonical(match[1]) not in pins, f"constraints.txt pins {match[1]} twice"
        pins[canonical(match[1])] = match[2]
    return pins


def readme_commands() -> list[str]:
    """The README's bash code blocks, in order (the first two are the newcomer's commands)."""
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)]


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9._-]+", requirement)[0])


def test_lock_pins_every_dependency_of_the_project():
    project = tomllib.loads(read("pyproject.toml"))["project"]
    wanted = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    pins = locked_versions()
    missing = sorted({requirement_name(r) for r in wanted} - set(pins))
    assert not missing, f"constraints.txt does not lock {missing}: add name==version lines for them"
    # the MONAI Label environment's own packages are locked too (tools/setup_monailabel.sh installs with the file)
    assert {"monailabel", "torchvision", "pydicom", "dicomweb-client", "pynetdicom", "pip"} <= set(pins)


def test_metadata_versions_are_the_locked_ones():
    metadata = json.loads(read("bundle", "configs", "metadata.json"))
    pins = locked_versions()
    assert metadata["monai_version"] == pins["monai"]
    assert metadata["pytorch_version"] == pins["torch"]
    assert metadata["numpy_version"] == pins["numpy"]
    packages = metadata["required_packages_version"]
    # every runtime dependency of pyproject.toml but the three with keys of their own
    runtime = {requirement_name(r) for r in tomllib.loads(read("pyproject.toml"))["project"]["dependencies"]}
    assert {canonical(p) for p in packages} == runtime - {"torch", "monai", "numpy"}
    for package, version in packages.items():
        assert pins.get(canonical(package)) == version, (
            f"metadata.json says {package} {version}, constraints.txt {pins.get(canonical(package))}"
        )


def test_every_install_command_uses_the_lock():
    setup, tests = readme_commands()[:2]
    installs = [part.strip() for part in setup.split("&&") if "pip install" in part]
    assert installs and all("-c constraints.txt" in part for part in installs), setup
    assert "torch==2.13.0" in installs[0], "the CPU torch wheel goes in first, so nothing resolves a CUDA build"
    ci = read(".ci", "run")
    for line in ci.splitlines():
        if "pip install" in line:
            assert "-c constraints.txt" in line, line
    assert '-c "$constraints"' in read("tools", "setup_monailabel.sh") and "constraints.txt" in read(
        "tools", "setup_monailabel.sh"
    )


def test_ci_runs_exactly_the_readme_test_command_which_makes_the_monailabel_venv():
    _, tests = readme_commands()[:2]
    ci_lines = [line.strip() for line in read(".ci", "run").splitlines() if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == tests, "the last line of .ci/run must be the README's test command, letter for letter"
    assert "tools/setup_monailabel.sh" in tests and tests.endswith("python -m pytest -q")


def test_monailabel_setup_finds_the_environment_it_made_up_to_date():
    """The README's test command ran tools/setup_monailabel.sh before pytest; a second call must keep that
    environment (same lock, same script, same checkout) and return at once instead of remaking 3.6 GB.
    ``--check`` takes the same decision without ever building."""
    venv = os.path.join(REPO_ROOT, ".venv-monailabel")
    if not os.path.isfile(os.path.join(venv, ".surgical-sam-stamp")):
        if os.environ.get("MONAILABEL_ABSENT") == "1" or os.environ.get("MONAILABEL_PYTHON"):
            pytest.skip("no MONAI Label environment made by tools/setup_monailabel.sh in this checkout")
        pytest.fail("no .venv-monailabel made by tools/setup_monailabel.sh: run the README's test command")
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "tools", "setup_monailabel.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr + " (run tools/setup_monailabel.sh)"
    assert "up to date" in result.stdout


# ------------------------------------------------------------------------- no top-level `scripts` installed
def environment_without_pythonpath() -> dict:
    """A subprocess's environment that finds ``scripts`` only the way a user's shell does (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_the_install_puts_no_top_level_scripts_package(tmp_path):
    """``pip install -e .`` installs the launcher ``surgical_sam_bundle`` only: a ``scripts`` in site-packages
    would be the ``scripts`` of every process of the environment and shadow other bundles' (MONAI Label loads
    several into one server: tests/test_monailabel_server.py serves two)."""
    setuptools = tomllib.loads(read("pyproject.toml"))["tool"]["setuptools"]
    assert setuptools["packages"] == ["surgical_sam_bundle"] and "package-dir" not in setuptools
    probe = (
        "import importlib.util as u; launcher = u.find_spec('surgical_sam_bundle'); "
        "print(u.find_spec('scripts') is None, launcher and launcher.origin)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=environment_without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", os.path.join(REPO_ROOT, "surgical_sam_bundle", "__init__.py")], (
        f"{result.stdout} (a stale install? run: pip install -c constraints.txt -e .)"
    )


def test_the_repository_root_resolves_scripts_to_the_bundle():
    """From the repository root ``scripts`` is bundle/scripts (the root's ``scripts`` link), so the model card's
    ``python -m monai.bundle run --config_file bundle/configs/...`` commands run there."""
    link = os.path.join(REPO_ROOT, "scripts")
    assert os.path.islink(link) and os.readlink(link) == os.path.join("bundle", "scripts")
    result = subprocess.run(
        [sys.executable, "-c", "import scripts; print(scripts.BUNDLE_ROOT)"],
        cwd=REPO_ROOT,
        env=environment_without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == os.path.realpath(os.path.join(REPO_ROOT, "bundle"))


def test_surgical_sam_runs_the_bundle_of_the_folder_it_is_called_from(tmp_path):
    """The installed command from the repository root (or any folder that holds no bundle) runs the checkout's
    bundle/; inside a copied bundle folder (``surgical-sam pack`` unpacked) it runs that copy's own scripts
    (``pack``'s default bundle is the folder of the ``scripts`` imported)."""
    command = os.path.join(os.path.dirname(sys.executable), "surgical-sam")
    assert os.access(command, os.X_OK), f"no {command}: install the repository (the README's first command)"

    def pack_from(cwd, out_dir) -> str:
        result = subprocess.run(
            [command, "pack", "--out_dir", str(out_dir)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
            env=environment_without_pythonpath(),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    bundle = os.path.join(REPO_ROOT, "bundle")
    assert f" of {bundle} into " in pack_from(REPO_ROOT, tmp_path / "from_root")
    (tmp_path / "elsewhere").mkdir()
    assert f" of {bundle} into " in pack_from(tmp_path / "elsewhere", tmp_path / "from_elsewhere")
    (zip_path,) = (tmp_path / "from_root").glob("*.zip")
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "copy")
    (copy,) = (tmp_path / "copy").iterdir()
    assert f" of {copy} into " in pack_from(copy, tmp_path / "from_copy")


def test_surgical_sam_outside_a_bundle_without_a_checkout_says_what_to_do(tmp_path, monkeypatch):
    """A non-editable install has no checkout beside the launcher: outside a bundle folder it stops and says
    where to run it; inside a copy of the bundle it runs that copy."""
    import surgical_sam_bundle

    monkeypatch.setattr(surgical_sam_bundle, "CHECKOUT_BUNDLE", tmp_path / "no_checkout" / "bundle")
    with pytest.raises(SystemExit, match="inside the bundle folder, or install the repository with 'pip install -e"):
        surgical_sam_bundle.bundle_folder(str(tmp_path))
    copy = tmp_path / "copy"
    for name in ("configs/metadata.json", "scripts/cli.py"):
        os.makedirs(copy / os.path.dirname(name), exist_ok=True)
        shutil.copyfile(os.path.join(REPO_ROOT, "bundle", name), copy / name)
    assert surgical_sam_bundle.bundle_folder(str(copy)) == copy.resolve()
