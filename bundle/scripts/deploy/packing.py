"""Packing the bundle into ``<name>_v<version>.zip`` (``surgical-sam pack``): which files a packed bundle
holds, and the zip written atomically."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from ..errors import BundleError
from ..files import atomic_write

#: What a packed bundle holds (paths relative to the bundle folder); everything else (data/, eval/, embedding
#: caches, SAM weights, model.ts, __pycache__) stays out.
PACKED_FOLDERS = ("configs", "scripts", "docs")
PACKED_FILES = ("large_files.yml", "LICENSE", "models/model.pt")


#: Never packed, even inside the folders above.
UNPACKED_SUFFIXES = (".pyc", ".pyo", ".pth", ".md5", ".tmp")


class PackError(BundleError, ValueError):
    """The bundle cannot be packed as asked (not a bundle folder, bad metadata.json, output inside the bundle)."""


def bundle_name(metadata: dict) -> str:
    """The bundle's folder name: metadata.json's ``name`` in lower case, runs of other characters as '_'
    ("SurgicalSAM surgical instrument segmentation" -> "surgicalsam_surgical_instrument_segmentation")."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "_", str(metadata.get("name", "")).lower()).strip("_")
    if not slug:
        raise PackError("metadata.json has no usable 'name' to name the bundle after.")
    return slug


def packed_files(root: Path) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files :func:`pack_bundle` puts in the zip."""
    found = [name for name in PACKED_FILES if (root / name).is_file()]
    for folder in PACKED_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and "__pycache__" not in relative.parts and not path.name.endswith(UNPACKED_SUFFIXES):
                found.append(relative.as_posix())
    return sorted(found)


def pack_bundle(root: Path, out_dir: str, with_onnx: bool = False) -> tuple[Path, list[str], str, str]:
    """Pack the bundle folder ``root`` into ``<out_dir>/<name>_v<version>.zip`` with one top-level folder ``<name>``.

    Name (:func:`bundle_name`) and version come from ``configs/metadata.json``; the files are
    :func:`packed_files` and, with ``with_onnx``, the ONNX export in ``models/onnx``.

    Returns:
        (the zip's path, the packed files relative to ``root``, name, version).

    Raises:
        PackError: ``root`` is no bundle folder, metadata.json is unusable, ``out_dir`` cannot be made or lies
            inside the bundle, or the ONNX export is incomplete.
    """
    meta_file = root / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise PackError(f"--bundle_root {root} is not a bundle folder: {meta_file} not found.")
    try:
        with open(meta_file) as handle:
            metadata = json.load(handle)
    except json.JSONDecodeError as error:
        raise PackError(f"{meta_file} is not valid JSON: {error}") from None
    version = str(metadata.get("version", "")).strip()
    if not version:
        raise PackError(f"{meta_file} has no 'version'.")
    name = bundle_name(metadata)
    missing = [folder for folder in ("configs", "scripts") if not (root / folder).is_dir()]
    if missing:
        raise PackError(f"--bundle_root {root} is not a bundle folder: missing {', '.join(missing)}/.")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise PackError(f"cannot create --out_dir {out_dir}: {error}") from None
    target = Path(out_dir).resolve() / f"{name}_v{version}.zip"
    if root in target.parents:
        raise PackError(f"--out_dir {out_dir} is inside the bundle {root}: choose a folder outside it.")
    if target.exists() and not _is_a_pack_of(target, name):
        raise PackError(
            f"{target} exists and is not a zip that pack wrote (one folder {name}/ inside): it is left "
            "as it is; choose another --out_dir or move that file."
        )
    files = packed_files(root)
    if with_onnx:
        from .onnx_backend import packed_onnx_files

        try:
            files += [Path(p).relative_to(root).as_posix() for p in packed_onnx_files(str(root / "models" / "onnx"))]
        except (OSError, ValueError) as error:
            raise PackError(f"--with_onnx: {error}") from None

    def write_zip(temporary: str) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for relative in files:
                archive.write(root / relative, f"{name}/{relative}")

    atomic_write(target, write_zip)
    return target, files, name, version


def _is_a_pack_of(path: Path, name: str) -> bool:
    """Whether ``path`` is a zip of the layout :func:`pack_bundle` writes (every member under ``name/``): pack
    replaces such a file, never another."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(members) and all(member.startswith(name + "/") for member in members)
