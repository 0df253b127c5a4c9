"""Facts of the public datasets the bundle knows, one definition each: class tables (CholecSeg8k's with its mask
colours) and the EndoVis2017 folds.

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
#: CholecSeg8k, label -> ((R, G, B) of the colour masks, name), label 0 the background (the corrected CholecSeg8k
#: colour table; getting and preparing the data: bundle/docs/workflows.md, "Each dataset from download to metrics").
#: Colours outside the table are ignored, never a class.
CHOLECSEG8K_COLOUR_TABLE = (
    ((127, 127, 127), "Background"),
    ((210, 140, 140), "Abdominal Wall"),
    ((255, 114, 114), "Liver"),
    ((231, 70, 156), "Gastrointestinal Tract"),
    ((186, 183, 75), "Fat"),
    ((170, 255, 0), "Grasper"),
    ((255, 85, 0), "Connective Tissue"),
    ((255, 0, 0), "Blood"),
    ((255, 255, 0), "Cystic Duct"),
    ((169, 255, 184), "L-hook Electrocautery"),
    ((255, 160, 165), "Gallbladder"),
    ((0, 50, 128), "Hepatic Vein"),
    ((111, 74, 0), "Liver Ligament"),
)
#: CholecSeg8k, class ids 1..12 (label 0, the background, is never prompted).
CHOLECSEG8K_CLASS_NAMES = tuple(name for _, name in CHOLECSEG8K_COLOUR_TABLE[1:])
#: The class tables by dataset name, as the configs name them.
CLASS_TABLES = {
    "endovis2018": ENDOVIS2018_CLASS_NAMES,
    "endovis2017": ENDOVIS2017_CLASS_NAMES,
    "cholecseg8k": CHOLECSEG8K_CLASS_NAMES,
}
#: EndoVis2017 cross-validation folds: the validation datasets (instrument_dataset_K) of each fold.
ENDOVIS2017_FOLDS = ((1, 3), (2, 5), (4, 8), (6, 7))


def class_names(dataset: str) -> list[str]:
    """The class names (ids 1..C) of a known dataset, e.g. ``class_names("endovis2018")``."""
    if dataset not in CLASS_TABLES:
        raise ValueError(
            f"unknown dataset {dataset!r}: choose one of {sorted(CLASS_TABLES)}, or write class_names "
            "as a list in the config"
        )
    return list(CLASS_TABLES[dataset])
