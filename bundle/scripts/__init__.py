"""Python of the SAM surgical segmentation bundle (SurgicalSAM, Distillation-SAM).

Configs under ``configs/`` refer to these modules as ``scripts.<module>``.
"""

import logging
import os
import sys
from pathlib import Path

from .engine import process_settings  # noqa: F401  (standard library only; configs call scripts.engine.process_settings)

#: Folder of the bundle whose code this is (the one holding configs/, models/, scripts/, docs/).
BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)

__version__ = "0.8.2"

_warned_roots: set = set()


def _running_config_root() -> str | None:
    """Folder of the first config file of the ``monai.bundle`` workflow (``ConfigWorkflow``) that is
    evaluating this config, or None outside one (e.g. a bare ``ConfigParser``, as MONAI Label uses, which
    sets ``bundle_root`` itself)."""
    try:
        from monai.bundle import ConfigWorkflow
    except ImportError:  # pragma: no cover - monai is a dependency
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow) and getattr(candidate, "config_root_path", None) is not None:
            root = Path(candidate.config_root_path)
            # the rule ConfigWorkflow.run uses to put the bundle folder on sys.path
            return os.path.abspath(str(root.parent if root.name == "configs" else root))
        frame = frame.f_back
    return None


def run_bundle_root() -> str:
    """The folder of the bundle whose configs are being run: ``bundle_root`` of every config.

    Under ``python -m monai.bundle run --config_file A/configs/train.yaml`` (or a ``ConfigWorkflow``) it is the
    folder above the first config file's ``configs/`` folder, so models, data and outputs stay in that bundle
    even when ``scripts`` was imported from another checkout (run from a first clone's root, or its PYTHONPATH);
    that mix is logged once as a warning. Elsewhere it is :data:`BUNDLE_ROOT`.
    """
    root = _running_config_root()
    if root is None:
        return BUNDLE_ROOT
    if os.path.realpath(root) != os.path.realpath(BUNDLE_ROOT) and root not in _warned_roots:
        _warned_roots.add(root)
        logging.getLogger(__name__).warning(
            "running the configs of the bundle %s with the code (scripts/) of %s, which comes first on the Python "
            "path (run from another checkout's root, or a PYTHONPATH?); bundle_root, hence models/, data/ and eval/, "
            "is %s. To run this bundle's own code: cd %s (or its repository's root), or set PYTHONPATH=%s.",
            root,
            BUNDLE_ROOT,
            root,
            root,
            root,
        )
    return root
