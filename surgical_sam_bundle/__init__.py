"""The installed ``surgical-sam`` command: finds the bundle folder and runs its ``scripts.cli``.

The bundle's Python is the package ``scripts`` inside the bundle folder (the MONAI bundle convention: configs say
``$import scripts`` and ``scripts.<module>``). Installing this project puts no top-level ``scripts`` into
site-packages, where it would be the ``scripts`` of every process of the environment, shadowing other bundles';
the only installed name is this launcher. The command runs the bundle of the current folder when that is a copy
of this bundle (an unpacked ``surgical-sam pack``), else the ``bundle/`` folder of the checkout installed
(``pip install -e``); ``python -m scripts.cli`` from a bundle folder does the same without the launcher.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: The checkout's bundle folder (an editable install runs this file from the checkout).
CHECKOUT_BUNDLE = Path(__file__).resolve().parent.parent / "bundle"


def is_this_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds this bundle: configs/metadata.json and the command's scripts/cli.py."""
    return (folder / "configs" / "metadata.json").is_file() and (folder / "scripts" / "cli.py").is_file()


def bundle_folder(cwd: str | None = None) -> Path:
    """The bundle folder ``surgical-sam`` runs: ``cwd`` (default: the current folder) when it is a copy of this
    bundle, else the installed checkout's ``bundle/``. Raises SystemExit, saying what to do, when neither is."""
    here = Path(cwd or os.getcwd()).resolve()
    if is_this_bundle(here):
        return here
    if is_this_bundle(CHECKOUT_BUNDLE):
        return CHECKOUT_BUNDLE
    raise SystemExit(
        f"surgical-sam: {here} is not a bundle folder (configs/metadata.json, scripts/cli.py) and this "
        f"install has no checkout beside it ({CHECKOUT_BUNDLE} missing): run the command inside the "
        "bundle folder, or install the repository with 'pip install -e .'"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``surgical-sam``: the bundle folder first on ``sys.path``, then its ``scripts.cli.main``."""
    folder = str(bundle_folder())
    sys.path.insert(0, folder)
    loaded = sys.modules.get("scripts")
    if loaded is not None and not str(getattr(loaded, "__file__", "") or "").startswith(folder + os.sep):
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]  # another folder's scripts imported before: not this bundle's
    from scripts.cli import main as cli_main

    cli_main(argv)
