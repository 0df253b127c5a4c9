"""Facts of the public datasets the bundle knows, one definition each: class tables and the EndoVis2017 folds.

Read by the preparations (which write them into dataset.json), by the demo generator (which names its classes
after EndoVis2018's), by the original-layout reader (the folds) and by the configs that state a model's classes
without a dataset (the dataset overlays, inference, MONAI Label training: :func:`class_names`); training reads
them from the prepared dataset's dataset.json.
"""

from __future__ import annotations

#: EndoVis2018, class ids 1..7 (ISINet's EndoVis2018 instrument types).
ENDOVIS2018_CLASS_NAMES = (
    "Bipolar Forceps",
    "Prograsp Forceps",
    "Large Needle Driver",
    "Monopolar Curved Scissors",
    "Ultrasound Probe",
    "Suction Instrument",
    "Clip Applier",
)
#: EndoVis2017, class ids 1..7 (ISINet's EndoVis2017 instrument types).
ENDOVIS2017_CLASS_NAMES = (
    "Bipolar Forceps",
    "Prograsp Forceps",
    "Large Needle Driver",
    "Vessel Sealer",
    "Grasping Retractor",
    "Monopolar Curved Scissors",
    "Other",
)
#: The class tables by dataset name, as the configs name them.
CLASS_TABLES = {"endovis2018": ENDOVIS2018_CLASS_NAMES, "endovis2017": ENDOVIS2017_CLASS_NAMES}
#: EndoVis2017 cross-validation folds: the validation datasets (instrument_dataset_K) of each fold.
ENDOVIS2017_FOLDS = ((1, 3), (2, 5), (4, 8), (6, 7))


def class_names(dataset: str) -> list[str]:
    """The class names (ids 1..C) of a known dataset, e.g. ``class_names("endovis2018")``."""
    if dataset not in CLASS_TABLES:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {sorted(CLASS_TABLES)}, or write class_names "
                         "as a list in the config")
    return list(CLASS_TABLES[dataset])
