"""The wheels ``tools/gpu_benchmark.py`` installs on a GPU machine that has torch but no network:
``python tools/gpu_wheels.py [--dest tools/wheels] [-- extra pip download options]``, run where the network is.

The list is the bundle's runtime dependencies (pyproject.toml) and what they need in turn, at the versions
installed here, without torch and its CUDA/Triton packages (the GPU machine brings its own). Pass pip's
``--python-version`` / ``--platform`` after ``--`` when the GPU machine's Python differs from this one.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
#: Distributions the GPU machine brings with its torch.
BROUGHT_WITH_TORCH = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> list[str]:
    """``name==version`` of every installed distribution the bundle needs at run time, torch's own excluded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    found: dict[str, str] = {}
    while todo:
        name = canonical(todo.pop())
        if name in found or BROUGHT_WITH_TORCH.match(name):
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement not installed here
        found[name] = distribution.version
        for requirement in distribution.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.split(r"[<>=!~\[; (]", requirement.strip(), maxsplit=1)[0])
    return sorted(f"{name}=={version}" for name, version in found.items())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(REPO / "tools" / "wheels"))
    parser.add_argument("--list_only", action="store_true", help="write requirements.txt, download nothing")
    parser.add_argument("pip_options", nargs="*", help="more `pip download` options (after --)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text("\n".join(runtime_requirements()) + "\n")
    if not args.list_only:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
        subprocess.run(command + ["-r", str(requirements)] + list(args.pip_options), check=True)
    return requirements


if __name__ == "__main__":
    main()
