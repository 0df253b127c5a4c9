"""Evaluation as in the paper: EndoVis2017 folds pooled (the EndoVis protocol) and cross-dataset scoring over shared
classes (Table 4), on crafted label maps with hand-computed numbers."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine

from scripts.cli import pool_metrics
from scripts.engine.batches import FrameBatch
from scripts.engine.handlers import MetricsReport
from scripts.evaluation.class_mapping import eval_to_model_lut, model_classes_to_prompt, remap_labels, shared_classes
from scripts.evaluation.metrics import EndoVisMetric
from scripts.evaluation.pooling import pool_frame_statistics, read_frame_statistics
from scripts.surgical_sam.inferer import ClassPromptInferer

NAMES = ["A", "B"]


def maps(*rows):
    return torch.tensor(rows, dtype=torch.long)


# Fold 0: A1 class 1 I=1 U=2 (0.5); A2 class 2 I=3 U=4 (0.75).
FOLD0 = [
    (maps([1, 0, 0, 0], [0, 0, 0, 0]), maps([1, 1, 0, 0], [0, 0, 0, 0])),
    (maps([2, 2, 2, 2], [0, 0, 0, 0]), maps([2, 2, 2, 0], [0, 0, 0, 0])),
]
# Fold 1: B1 nothing predicted, GT all class 1 (0 to IoU, Challenge and class 1);
#         B2 a false class-2 pixel on an empty frame (auto: 0 to IoU and class 2, U += 1).
FOLD1 = [
    (maps([0, 0, 0, 0], [0, 0, 0, 0]), maps([1, 1, 1, 1], [1, 1, 1, 1])),
    (maps([2, 0, 0, 0], [0, 0, 0, 0]), maps([0, 0, 0, 0], [0, 0, 0, 0])),
]


def evaluate(pairs, metrics_file, names=NAMES, protocol="auto"):
    """An evaluator-like engine: EndoVisMetric as key metric + MetricsReport, one frame per iteration."""
    engine = Engine(lambda engine, batch: (batch[0][None], batch[1][None], torch.tensor([True])))
    EndoVisMetric(len(names), names).attach(engine, "challenge_iou")
    MetricsReport(str(metrics_file), protocol=protocol).attach(engine)
    engine.run(pairs, max_epochs=1)
    with open(metrics_file) as handle:
        return json.load(handle)


def test_per_fold_metrics_and_frame_stats_file(tmp_path):
    fold0 = evaluate(FOLD0, tmp_path / "fold0" / "auto" / "metrics.json")
    assert fold0["challenge_iou"] == pytest.approx(62.5) and fold0["iou"] == pytest.approx(62.5)
    assert fold0["miou"] == pytest.approx(100 * 4 / 6)
    assert fold0["frame_stats_file"] == "frame_stats.json"
    record = read_frame_statistics(tmp_path / "fold0" / "auto" / "metrics.json")
    assert record["protocol"] == "auto" and record["class_names"] == NAMES
    assert record["has_entry"] == [True, True]
    # frame A2: class 1 absent on both sides, class 2: I=3, U=4, predicted, in GT
    assert record["stats"][1].tolist() == [[0, 0, 0, 0], [3, 4, 1, 1]]
    fold1 = evaluate(FOLD1, tmp_path / "fold1" / "auto" / "metrics.json")
    assert fold1["challenge_iou"] == 0.0 and fold1["iou"] == 0.0 and fold1["miou"] == 0.0


def test_pooling_concatenates_frames_not_means(tmp_path, capsys):
    files = [
        evaluate(pairs, tmp_path / f"fold{i}" / "auto" / "metrics.json")
        and str(tmp_path / f"fold{i}" / "auto" / "metrics.json")
        for i, pairs in enumerate((FOLD0, FOLD1))
    ]
    pooled = pool_metrics(",".join(files), output=str(tmp_path / "pooled.json"))
    # Challenge list [0.5, 0.75, 0]; IoU list [0.5, 0.75, 0, 0]; class 1 [0.5, 0]; class 2 [0.75, 0];
    # cumulative I = 1 + 3, U = 2 + 4 + 1.
    assert pooled["challenge_iou"] == pytest.approx(100 * 1.25 / 3)  # mean of fold means would be 31.25
    assert pooled["iou"] == pytest.approx(31.25)
    assert pooled["class_iou"] == {"A": pytest.approx(25.0), "B": pytest.approx(37.5)}
    assert pooled["mc_iou"] == pytest.approx(31.25)
    assert pooled["miou"] == pytest.approx(100 * 4 / 7)  # mean of fold mIoUs would be 33.33
    assert pooled["num_frames"] == 4
    written = json.loads((tmp_path / "pooled.json").read_text())
    assert written["challenge_iou"] == pytest.approx(pooled["challenge_iou"])
    out = capsys.readouterr().out
    assert "pooled" in out and "41.67" in out and "62.50" in out


def test_pooling_equals_one_evaluation_of_all_frames(tmp_path):
    files = []
    for i, pairs in enumerate((FOLD0, FOLD1)):
        evaluate(pairs, tmp_path / f"f{i}" / "metrics.json")
        files.append(tmp_path / f"f{i}" / "metrics.json")
    together = evaluate(FOLD0 + FOLD1, tmp_path / "all" / "metrics.json")
    pooled = pool_frame_statistics(files)
    for key in ("challenge_iou", "iou", "mc_iou", "miou", "num_frames"):
        assert pooled[key] == pytest.approx(together[key]), key


def test_pooling_refuses_mixed_inputs(tmp_path):
    evaluate(FOLD0, tmp_path / "a" / "metrics.json")
    evaluate(FOLD1, tmp_path / "b" / "metrics.json", names=["A", "C"])
    evaluate(FOLD1, tmp_path / "c" / "metrics.json", protocol="oracle")
    with pytest.raises(ValueError, match="classes"):
        pool_frame_statistics([tmp_path / "a" / "metrics.json", tmp_path / "b" / "metrics.json"])
    with pytest.raises(ValueError, match="protocol"):
        pool_frame_statistics([tmp_path / "a" / "metrics.json", tmp_path / "c" / "metrics.json"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="frame_stats.json"):
        pool_metrics(str(tmp_path / "old" / "metrics.json"))
    with pytest.raises(SystemExit, match="--inputs"):
        pool_metrics("")


# ------------------------------------------------------------------------------------------ cross-dataset
MODEL = ["Bipolar Forceps", "Vessel Sealer", "Large Needle Driver"]
EVAL = ["large_needle_driver", "Clip Applier", "bipolar forceps"]


def test_shared_classes_by_name_and_class_map():
    assert shared_classes(MODEL, EVAL) == [(1, 3, "Bipolar Forceps"), (3, 1, "Large Needle Driver")]
    assert shared_classes(MODEL, EVAL, {"Vessel Sealer": "Clip Applier"}) == [
        (1, 3, "Bipolar Forceps"),
        (2, 2, "Vessel Sealer"),
        (3, 1, "Large Needle Driver"),
    ]
    assert shared_classes(MODEL, EVAL, {"Vessel Sealer": "Clip Applier"}, shared_only_from_map=True) == [
        (2, 2, "Vessel Sealer")
    ]
    with pytest.raises(ValueError, match="not a class of the model"):
        shared_classes(MODEL, EVAL, {"Grasper": "Clip Applier"})
    with pytest.raises(ValueError, match="share no name"):
        shared_classes(["X"], ["Y"])
    # an explicit pair wins over equal names: Bipolar Forceps then has no partner
    assert shared_classes(MODEL, EVAL, {"Vessel Sealer": "bipolar forceps"}) == [
        (2, 3, "Vessel Sealer"),
        (3, 1, "Large Needle Driver"),
    ]
    with pytest.raises(ValueError, match="several model classes"):
        shared_classes(MODEL, EVAL, {"Vessel Sealer": "bipolar forceps", "Bipolar Forceps": "Bipolar_Forceps"})


def test_label_lut_and_prompts():
    pairs = shared_classes(MODEL, EVAL)
    lut = eval_to_model_lut(pairs, len(EVAL))
    assert lut[:4] == [0, 3, 255, 1] and lut[255] == 255 and lut[7] == 255
    assert model_classes_to_prompt(pairs) == [1, 3]
    gt_eval = maps([3, 3, 2, 2], [1, 0, 0, 255])
    assert remap_labels(gt_eval, lut).tolist() == [[1, 1, 255, 255], [3, 0, 0, 255]]
    inferer = ClassPromptInferer(3, protocol="auto", prompt_classes=[1, 3])
    assert inferer.classes_to_prompt(2, None, "cpu").tolist() == [[True, False, True]] * 2
    oracle = ClassPromptInferer(3, protocol="oracle", prompt_classes=[1, 3])
    gt_model = maps([2, 2, 0, 0], [1, 0, 0, 0])[None, None]  # class 2 in GT: not shared, never prompted
    assert oracle.classes_to_prompt(1, gt_model, "cpu").tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="prompt_classes"):
        ClassPromptInferer(3, prompt_classes=[4])


def test_cross_dataset_metric_over_shared_classes(tmp_path):
    """GT in the evaluation dataset's ids goes through FrameBatch's look-up table; the unshared class
    (Clip Applier) is ignored; the model's unshared class (Vessel Sealer) has no entry."""
    lut = eval_to_model_lut(shared_classes(MODEL, EVAL), len(EVAL))
    batch = {"image_embeddings": torch.zeros(1, 4, 2, 2), "label": maps([3, 3, 2, 2], [1, 0, 0, 0])[None, None]}
    _, label, _, kwargs = FrameBatch(label_lut=lut)(batch)
    assert label.tolist() == [[[[1, 1, 255, 255], [3, 0, 0, 0]]]] and kwargs["gt_label"] is label
    pred = maps([1, 0, 0, 1], [3, 3, 0, 0])[None, None]  # (0, 3) lies on an ignored pixel
    metric = EndoVisMetric(3, MODEL)
    metric.update((pred, label, torch.tensor([True])))
    result = metric.compute()
    # class 1: pred {(0,0)}, GT {(0,0),(0,1)}: 1/2; class 3: pred {(1,0),(1,1)}, GT {(1,0)}: 1/2
    assert result["class_iou"] == {"Bipolar Forceps": 50.0, "Vessel Sealer": None, "Large Needle Driver": 50.0}
    assert result["challenge_iou"] == 50.0 and result["mc_iou"] == 50.0 and result["miou"] == 50.0
    with pytest.raises(ValueError, match="256 entries"):
        FrameBatch(label_lut=[0, 1])


def test_pool_metrics_from_the_command_line(tmp_path, capsys):
    from scripts.cli import main

    files = []
    for i, pairs in enumerate((FOLD0, FOLD1)):
        evaluate(pairs, tmp_path / f"fold{i}" / "oracle" / "metrics.json", protocol="oracle")
        files.append(str(tmp_path / f"fold{i}" / "oracle" / "metrics.json"))
    output = tmp_path / "pooled.json"
    main(["pool_metrics", "--inputs", ",".join(files), "--output", str(output)])
    pooled = json.loads(output.read_text())
    assert pooled["protocol"] == "oracle" and pooled["num_frames"] == 4
    assert pooled["miou"] == pytest.approx(100 * 4 / 7)
    assert "pooled metrics written" in capsys.readouterr().out
