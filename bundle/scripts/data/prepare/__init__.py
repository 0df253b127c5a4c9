"""Preparation commands: raw EndoVis2017 / EndoVis2018 / CholecSeg8k / custom folders -> the bundle's layout.

One module per source (its docstring gives the exact raw layout it reads) and :mod:`.common` for the
machinery they share (out_dir safety, resuming, atomic writes, the summary). The ``surgical-sam``
commands ``prepare_endovis2017``, ``prepare_endovis2018``, ``prepare_cholecseg8k`` and
``prepare_custom`` call :func:`prepare_endovis2017` ... :func:`prepare_custom`.
"""

from scripts.data.prepare.cholecseg8k import prepare_cholecseg8k
from scripts.data.prepare.custom import prepare_custom
from scripts.data.prepare.endovis2017 import prepare_endovis2017
from scripts.data.prepare.endovis2018 import prepare_endovis2018
from scripts.data.prepare.output_folder import SUMMARY_FILE

__all__ = ["SUMMARY_FILE", "prepare_cholecseg8k", "prepare_custom", "prepare_endovis2017", "prepare_endovis2018"]
