"""Python of the SAM surgical segmentation bundle (SurgicalSAM, Distillation-SAM).

Configs under ``configs/`` refer to these modules as ``scripts.<module>``.
"""

from pathlib import Path

from . import process_settings  # noqa: F401  (standard library only; configs call scripts.process_settings)

#: Folder of the bundle (the one holding configs/, models/, scripts/, docs/).
BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)

__version__ = "0.3.1"
