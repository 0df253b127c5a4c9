"""Facts of the public datasets the bundle knows, one definition each: class tables and the EndoVis2017 folds.

Read by the preparations (which write them into dataset.json), by the demo generator (which names its classes
after EndoVis2018's) and by the original-layout reader (the folds); everything else reads the class names from
a prepared dataset's dataset.json.
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
#: EndoVis2017 cross-validation folds: the validation datasets (instrument_dataset_K) of each fold.
ENDOVIS2017_FOLDS = ((1, 3), (2, 5), (4, 8), (6, 7))
