"""The dataset overlays (endovis2018/2017, cholecseg8k), the original-layout overlay and the cross-dataset
overlay, merged over train.yaml / evaluate.yaml: values, splits, per-fold folders, ConfigWorkflow
properties, and a short train + evaluate run on a tiny original layout."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from conftest import META_FILE, SMALL_DEMO, checked_workflow
from monai.bundle import ConfigParser, ConfigWorkflow
from test_original_layout import FRAME as LAYOUT_FRAME
from test_original_layout import NAMES as LAYOUT_NAMES
from test_original_layout import make_2018

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "bundle", "configs")
TRAIN, EVALUATE, E2018, E2017, CHOLEC, ORIGINAL, CROSS = (
    os.path.join(CONFIGS, f"{name}.yaml")
    for name in ("train", "evaluate", "endovis2018", "endovis2017", "cholecseg8k", "original_layout", "cross_dataset")
)
E2017_NAMES = [
    "Bipolar Forceps",
    "Prograsp Forceps",
    "Large Needle Driver",
    "Vessel Sealer",
    "Grasping Retractor",
    "Monopolar Curved Scissors",
    "Other",
]

pytestmark = pytest.mark.usefixtures("restore_root_logging")  # ConfigWorkflow reconfigures the root logger


def parsed(files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(overrides)
    return parser


# -------------------------------------------------------------------------------------- plain values
def test_endovis2018_values():
    parser = parsed([TRAIN, E2018])
    assert parser.get_parsed_content("num_classes") == 7 and parser.get_parsed_content("num_tokens") == 2
    assert parser["learning_rate"] == 0.001 and parser["num_epochs"] == 500
    assert parser.get_parsed_content("class_names")[3] == "Monopolar Curved Scissors"


def test_endovis2017_values_and_per_fold_folders():
    folders = {}
    for fold in range(4):
        parser = parsed([TRAIN, E2017], fold=fold)
        assert parser["num_tokens"] == 4 and parser["learning_rate"] == 0.0001 and parser["num_epochs"] == 2000
        assert parser.get_parsed_content("class_names") == E2017_NAMES
        assert parser.get_parsed_content("train_split") == f"fold{fold}_training"
        assert parser.get_parsed_content("val_split") == f"fold{fold}_validation"
        root = parser.get_parsed_content("bundle_root")
        assert parser.get_parsed_content("sam_checkpoint") == root + "/models/sam_vit_h_4b8939.pth"
        folders[fold] = (
            parser.get_parsed_content("ckpt_dir"),
            parser.get_parsed_content("output_dir"),
            parser.get_parsed_content("training_state_dir"),
        )
        assert folders[fold][0].endswith(f"models/endovis2017/fold{fold}")
    assert len({f for triple in folders.values() for f in triple}) == 12  # no two folds share a folder
    evaluation = parsed([TRAIN, E2017, EVALUATE], fold=3, protocol="oracle")
    assert evaluation.get_parsed_content("metrics_file").endswith("eval/endovis2017/fold3/oracle/metrics.json")
    assert evaluation.get_parsed_content("model_file").endswith("models/endovis2017/fold3/model.pt")


def test_cholecseg8k_values():
    parser = parsed([TRAIN, CHOLEC])
    assert parser.get_parsed_content("num_classes") == 12  # 0 = black background is the background
    names = parser.get_parsed_content("class_names")
    assert names[0] == "Abdominal Wall" and names[-1] == "Liver Ligament"
    assert "Background" not in names
    assert parser["frame_size"] == [480, 854]


# ------------------------------------------------------------------------------- ConfigWorkflow checks
@pytest.fixture(scope="module")
def fold_data(tmp_path_factory, small_demo_dir, small_sam_checkpoint):
    """A copy of the small demo with fold2 splits, and one cache of all its splits (shared entries)."""
    from scripts.embedding_cache import precompute_embeddings

    root = tmp_path_factory.mktemp("folds")
    data = str(root / "data")
    shutil.copytree(small_demo_dir, data)
    with open(os.path.join(data, "dataset.json")) as handle:
        description = json.load(handle)
    sequences = sorted({item["sequence"] for item in description["training"]})
    description["fold2_training"] = description["validation"] + [
        i for i in description["training"] if i["sequence"] == sequences[0]
    ]
    description["fold2_validation"] = [i for i in description["training"] if i["sequence"] == sequences[1]]
    # EndoVis2017 data for the EndoVis2017 overlay: its class names are checked against dataset.json's by name
    description["classes"] = {str(i): name for i, name in enumerate(E2017_NAMES, start=1)}
    with open(os.path.join(data, "dataset.json"), "w") as handle:
        json.dump(description, handle)
    cache = str(root / "cache")
    precompute_embeddings(
        data,
        cache,
        "tiny",
        small_sam_checkpoint,
        splits=("training", "validation", "fold2_training", "fold2_validation"),
        augmentation_versions=1,
    )
    return data, cache


def small_overrides(tmp_path, sam_checkpoint, **extra):
    return {
        "sam_variant": "tiny",
        "sam_checkpoint": str(sam_checkpoint),
        "bundle_root": str(tmp_path / "bundle"),
        "augmentation_versions": 1,
        "num_workers": 0,
        "batch_size": 4,
        "val_batch_size": 2,
        **extra,
    }


def test_endovis2017_fold_workflow_properties(tmp_path, fold_data, small_sam_checkpoint):
    data, cache = fold_data
    workflow = checked_workflow(
        [TRAIN, E2017],
        "train",
        fold=2,
        dataset_dir=data,
        cache_dir=cache,
        frame_size=list(SMALL_DEMO["frame_size"]),
        **small_overrides(tmp_path, small_sam_checkpoint),
    )
    assert workflow.train_dataset.split == "fold2_training"
    keys = {e["key"] for e in workflow.parser.get_parsed_content("validate#dataset").entries}
    assert keys == {e["key"] for e in workflow.parser.get_parsed_content("embedding_cache").entries("fold2_validation")}
    assert workflow.parser.get_parsed_content("network").num_tokens == 4
    workflow.parser.get_parsed_content("training#0")  # the input check passes for the fold's splits


def test_cholecseg8k_workflow_properties(tmp_path, small_sam_checkpoint):
    from scripts.data.demo import make_demo_dataset
    from scripts.embedding_cache import precompute_embeddings

    data = make_demo_dataset(
        str(tmp_path / "data"),
        frame_size=(48, 80),
        num_classes=12,
        train_sequences=1,
        val_sequences=1,
        frames_per_sequence=3,
    )
    cache = str(tmp_path / "cache")
    precompute_embeddings(data, cache, "tiny", small_sam_checkpoint, augmentation_versions=1)
    workflow = checked_workflow(
        [TRAIN, CHOLEC],
        "train",
        dataset_dir=data,
        cache_dir=cache,
        frame_size=[48, 80],
        **small_overrides(tmp_path, small_sam_checkpoint),
    )
    assert workflow.parser.get_parsed_content("network").num_classes == 12


def test_cross_dataset_overlay_maps_shared_classes(tmp_path, small_cache_dir, small_demo_dir, small_sam_checkpoint):
    """An EndoVis2017 model scored on EndoVis2018-named data: BF, PF, LND and MCS are shared."""
    workflow = ConfigWorkflow(
        config_file=[TRAIN, E2017, EVALUATE, CROSS],
        workflow_type=None,
        meta_file=META_FILE,
        logging_file=None,
        dataset_dir=small_demo_dir,
        cache_dir=small_cache_dir,
        frame_size=list(SMALL_DEMO["frame_size"]),
        val_split="validation",
        train_split="training",
        **small_overrides(tmp_path, small_sam_checkpoint),
    )
    workflow.initialize()
    parser = workflow.parser
    shared = parser.get_parsed_content("shared_classes")
    assert [(m, e) for m, e, _ in shared] == [(1, 1), (2, 2), (3, 3), (6, 4)]
    lut = parser.get_parsed_content("validate#prepare_batch").label_lut
    assert lut[:8] == [0, 1, 2, 3, 6, 255, 255, 255]
    assert parser.get_parsed_content("validate#inferer").allowed.tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
    ]
    assert parser.get_parsed_content("metrics_file").endswith("cross_dataset/oracle/metrics.json")
    assert parser.get_parsed_content("validate#evaluator") is not None


def test_original_layout_train_and_evaluate(tmp_path, small_sam_checkpoint):
    """Train one epoch on a tiny original layout, then evaluate: metrics.json and frame_stats.json."""
    make_2018(str(tmp_path / "data"), versions=1)
    common = dict(
        data_root=str(tmp_path / "data"),
        class_names=LAYOUT_NAMES,
        frame_size=list(LAYOUT_FRAME),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        num_epochs=1,
        **small_overrides(tmp_path, small_sam_checkpoint),
    )
    train = checked_workflow([TRAIN, E2018, ORIGINAL], "train", **common)
    train.run()
    train.finalize()
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    evaluate = ConfigWorkflow(
        config_file=[TRAIN, E2018, EVALUATE, ORIGINAL],
        workflow_type=None,
        meta_file=META_FILE,
        logging_file=None,
        run_id="evaluating",
        **common,
    )
    evaluate.initialize()
    evaluate.run()
    evaluate.finalize()
    metrics = json.loads((tmp_path / "eval" / "oracle" / "metrics.json").read_text())
    assert metrics["num_frames"] == 2  # oracle: the validation frame without instruments has no entry
    stats = json.loads((tmp_path / "eval" / "oracle" / "frame_stats.json").read_text())
    assert stats["has_entry"] == [True, True, False] and stats["class_names"] == LAYOUT_NAMES
    # the GT columns come from the binary masks: frame 00000 has classes 1 and 2, 00001 class 3
    assert [[row[3] for row in frame] for frame in stats["stats"]] == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert stats["stats"][0][0][1] >= 32 * 40  # union of class 1 is at least its GT area


def test_original_layout_missing_data_fails_at_once(tmp_path, small_sam_checkpoint):
    make_2018(str(tmp_path / "data"), versions=0)
    workflow = ConfigWorkflow(
        config_file=[TRAIN, E2018, ORIGINAL],
        workflow_type="train",
        meta_file=META_FILE,
        logging_file=None,
        data_root=str(tmp_path / "data"),
        class_names=LAYOUT_NAMES,
        frame_size=list(LAYOUT_FRAME),
        **small_overrides(tmp_path, small_sam_checkpoint),
    )
    workflow.initialize()
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the expression's error
        workflow.parser.get_parsed_content("training#0")
    cause = error.value.__cause__
    assert isinstance(cause, FileNotFoundError) and "cannot run on the original layout" in str(cause)
    assert os.path.join("train", "1", "sam_features_h") in str(cause) and "augmentation_versions" in str(cause)


def test_class_names_are_written_once_per_dataset():
    """The configs name a dataset's class table (scripts.data.known_datasets.class_names) instead of copying it."""
    from scripts.data.known_datasets import CLASS_TABLES

    copies = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(TRAIN), "*.yaml"))):
        text = open(path).read()
        copies += [
            f"{os.path.basename(path)}: {name}" for name in ("Vessel Sealer", "Suction Instrument") if name in text
        ]
    assert not copies, copies
    assert all(name in CLASS_TABLES for name in ("endovis2018", "endovis2017"))
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps the component's error
        parsed([TRAIN, E2018], **{"class_names#dataset": "endovis2019"}).get_parsed_content("class_names")
    assert "unknown dataset 'endovis2019'" in str(raised.value.__cause__)
