"""Tests of the engine glue (scripts.engine.handlers) and the class-prompt inferer (scripts.surgical_sam.inferer)."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from conftest import use_float64_dense_pe
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch import nn

from scripts.embedding_cache import StaleCacheError
from scripts.engine.batches import FrameBatch
from scripts.engine.checks import check_evaluation_inputs, check_training_inputs
from scripts.engine.handlers import (
    AugmentationVersionHandler,
    GradientNormClipping,
    MetricsReport,
    TrainingState,
    endovis_metric_inputs,
)
from scripts.surgical_sam.batches import MicroBatchIteration, PromptedSampleBatch
from scripts.surgical_sam.inferer import ClassPromptInferer

NUM_CLASSES = 3
H, W = 8, 10


# -------------------------------------------------------------------------------------- batch preparation
def test_prompted_sample_batch():
    batch = {
        "image_embeddings": torch.randn(2, 256, 4, 4),
        "mask": torch.zeros(2, 1, H, W),
        "grid_mask": torch.zeros(2, 4, 4, dtype=torch.bool),
        "class_id": torch.tensor([1, 3]),
        "unused": "x",
    }
    inputs, targets, args, kwargs = PromptedSampleBatch()(batch, torch.device("cpu"))
    assert inputs is not None and torch.equal(inputs, batch["image_embeddings"])
    assert set(targets) == {"mask", "grid_mask", "class_id"}
    for key in targets:
        assert torch.equal(targets[key], batch[key])
    assert args == ()
    assert set(kwargs) == {"class_ids"} and torch.equal(kwargs["class_ids"], torch.tensor([1, 3]))


def test_frame_batch():
    batch = {
        "image_embeddings": torch.randn(2, 256, 4, 4),
        "label": torch.randint(0, 4, (2, 1, H, W)),
        "key": ["a", "b"],
    }
    inputs, label, args, kwargs = FrameBatch()(batch, torch.device("cpu"))
    assert torch.equal(inputs, batch["image_embeddings"]) and torch.equal(label, batch["label"])
    assert args == () and torch.equal(kwargs["gt_label"], batch["label"])
    frames = {"image": torch.zeros(1, 3, H, W), "seg": torch.ones(1, 1, H, W, dtype=torch.long)}
    inputs, label, _, kwargs = FrameBatch(image_key="image", label_key="seg")(frames)
    assert inputs.shape == (1, 3, H, W) and torch.equal(kwargs["gt_label"], frames["seg"])


def test_endovis_metric_inputs():
    output = {"pred": {"label_map": 1, "has_entry": 2, "present": 3}, "label": 4}
    assert endovis_metric_inputs(output) == (1, 4, 2)


# ----------------------------------------------------------------------------------------------- inferer
class FakePromptable:
    """Stands in for SurgicalSAM: records the class masks and returns fixed logits and qualities."""

    def __init__(self, logits: torch.Tensor, quality: torch.Tensor) -> None:
        self.logits, self.quality, self.calls = logits, quality, []

    def predict_classes(self, inputs, class_mask, pairs_per_pass=32):
        self.calls.append(class_mask.clone())
        logits = torch.where(class_mask[..., None, None], self.logits, torch.tensor(float("-inf")))
        quality = torch.where(class_mask, self.quality, torch.tensor(float("-inf")))
        return logits, quality


def square(top, left, size=4):
    mask = torch.full((H, W), -5.0)
    mask[top : top + size, left : left + size] = 5.0
    return mask


@pytest.fixture
def fake_network():
    # frame 0: classes 1 and 2 overlap; frame 1: class 3 only; frame 2: nothing
    logits = torch.full((3, NUM_CLASSES, H, W), -5.0)
    logits[0, 0], logits[0, 1] = square(0, 0), square(2, 2)
    logits[1, 2] = square(4, 5)
    quality = torch.tensor([[0.2, 0.9, 0.5], [0.5, 0.5, 0.7], [0.1, 0.1, 0.1]])
    return FakePromptable(logits, quality)


def gt_labels():
    gt = torch.zeros(3, 1, H, W, dtype=torch.long)
    gt[0, 0, 0:2, 0:2] = 1
    gt[0, 0, 5:7, 0:2] = 2
    gt[1, 0, 4:8, 5:9] = 3
    return gt  # frame 2: no instrument


def test_oracle_prompts_exactly_the_gt_classes(fake_network):
    inferer = ClassPromptInferer(NUM_CLASSES, protocol="oracle")
    output = inferer(torch.zeros(3, 256, 4, 4), fake_network, gt_label=gt_labels())
    (class_mask,) = fake_network.calls
    expected = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    assert torch.equal(class_mask.cpu(), expected)
    assert output["has_entry"].tolist() == [True, True, False]  # no GT instrument: no entry
    assert torch.equal(output["present"], expected)
    assert output["label_map"].shape == (3, 1, H, W)
    assert not output["label_map"][2].any()


def test_oracle_needs_ground_truth(fake_network):
    with pytest.raises(ValueError, match="gt_label"):
        ClassPromptInferer(NUM_CLASSES, protocol="oracle")(torch.zeros(3, 256, 4, 4), fake_network)


def test_auto_prompts_every_class(fake_network):
    inferer = ClassPromptInferer(NUM_CLASSES, protocol="auto", min_mask_fraction=0.0)
    output = inferer(torch.zeros(3, 256, 4, 4), fake_network)  # no GT needed
    (class_mask,) = fake_network.calls
    assert class_mask.all() and class_mask.shape == (3, NUM_CLASSES)
    assert output["has_entry"].tolist() == [True, True, True]
    assert output["present"].tolist() == [[True, True, False], [False, False, True], [False, False, False]]
    torch.testing.assert_close(output["quality"], fake_network.quality)


def test_auto_min_mask_fraction(fake_network):
    # the squares have 16 pixels of the H*W = 80: 16/80 = 0.2 counts, anything above does not
    output = ClassPromptInferer(NUM_CLASSES, protocol="auto", min_mask_fraction=0.2)(
        torch.zeros(3, 256, 4, 4), fake_network
    )
    assert output["present"].any()
    inferer = ClassPromptInferer(NUM_CLASSES, protocol="auto", min_mask_fraction=0.201)
    output = inferer(torch.zeros(3, 256, 4, 4), fake_network)
    assert not output["present"].any() and not output["label_map"].any()
    with pytest.raises(ValueError, match="min_mask_fraction"):
        ClassPromptInferer(NUM_CLASSES, min_mask_fraction=1.5)


def test_oracle_keeps_small_masks_that_auto_drops():
    # A 20x20 frame (400 pixels); the network's class-2 mask is 2 pixels = 0.5% of it, the same as the
    # ground truth. Under the oracle every prompted mask is merged (IoU 1 here); under auto at 1% it
    # is dropped as too small.
    logits = torch.full((1, NUM_CLASSES, 20, 20), -5.0)
    logits[0, 1, 3, 4:6] = 5.0
    quality = torch.tensor([[0.5, 0.6, 0.7]])
    gt = torch.zeros(1, 1, 20, 20, dtype=torch.long)
    gt[0, 0, 3, 4:6] = 2
    oracle = ClassPromptInferer(NUM_CLASSES, protocol="oracle", min_mask_fraction=0.01)
    output = oracle(torch.zeros(1, 256, 4, 4), FakePromptable(logits, quality), gt_label=gt)
    assert output["present"].tolist() == [[False, True, False]]
    assert torch.equal(output["label_map"], gt)
    auto = ClassPromptInferer(NUM_CLASSES, protocol="auto", min_mask_fraction=0.01)
    output = auto(torch.zeros(1, 256, 4, 4), FakePromptable(logits, quality))
    assert not output["present"].any() and not output["label_map"].any()
    # the same mask passes at 0.5% under auto too: the threshold, not the protocol, dropped it
    auto = ClassPromptInferer(NUM_CLASSES, protocol="auto", min_mask_fraction=0.005)
    assert auto(torch.zeros(1, 256, 4, 4), FakePromptable(logits, quality))["present"].tolist() == [
        [False, True, False]
    ]


def test_label_map_merge_by_quality(fake_network):
    output = ClassPromptInferer(NUM_CLASSES, protocol="auto")(torch.zeros(3, 256, 4, 4), fake_network)
    label_map = output["label_map"]
    assert label_map.dtype == torch.long
    assert label_map[0, 0, 0, 0] == 1  # class 1 only
    assert label_map[0, 0, 2, 2] == 2  # overlap: class 2 has the higher quality (0.9 > 0.2)
    assert label_map[0, 0, 5, 5] == 2
    assert label_map[0, 0, 7, 7] == 0
    assert (label_map[0] == 1).sum() == 16 - 4
    assert (label_map[1] == 3).sum() == 16 and (label_map[1] != 3).sum() == (label_map[1] == 0).sum()
    # swap the qualities: class 1 wins the overlap
    fake_network.quality[0] = torch.tensor([0.9, 0.2, 0.5])
    label_map = ClassPromptInferer(NUM_CLASSES, protocol="auto")(torch.zeros(3, 256, 4, 4), fake_network)["label_map"]
    assert label_map[0, 0, 2, 2] == 1 and label_map[0, 0, 5, 5] == 2


def test_label_map_output(fake_network):
    inferer = ClassPromptInferer(NUM_CLASSES, protocol="auto", output="label_map")
    label_map = inferer(torch.zeros(3, 256, 4, 4), fake_network)
    assert isinstance(label_map, torch.Tensor)
    assert label_map.shape == (3, 1, H, W) and label_map.dtype == torch.long


def test_inferer_unwraps_module(fake_network):
    wrapper = nn.Module()
    wrapper.module = fake_network  # like DistributedDataParallel
    ClassPromptInferer(NUM_CLASSES, protocol="auto")(torch.zeros(3, 256, 4, 4), wrapper)
    assert len(fake_network.calls) == 1


def test_inferer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="protocol"):
        ClassPromptInferer(NUM_CLASSES, protocol="gt")
    with pytest.raises(ValueError, match="output"):
        ClassPromptInferer(NUM_CLASSES, output="masks")


def test_inferer_with_tiny_surgical_sam():
    from scripts.surgical_sam.network import SurgicalSAM

    torch.manual_seed(0)
    model = SurgicalSAM(NUM_CLASSES, 2, (H * 4, W * 4), sam_variant="tiny").eval()
    embeddings = 0.5 * torch.randn(2, 256, 16, 16, generator=torch.Generator().manual_seed(1))
    gt = torch.zeros(2, 1, H * 4, W * 4, dtype=torch.long)
    gt[0, 0, :5, :5] = 2
    with torch.no_grad():
        oracle = ClassPromptInferer(NUM_CLASSES, protocol="oracle", pairs_per_pass=2)(embeddings, model, gt_label=gt)
        auto = ClassPromptInferer(NUM_CLASSES, protocol="auto", pairs_per_pass=2)(embeddings, model)
    assert oracle["has_entry"].tolist() == [True, False]
    assert oracle["quality"][0, 1].isfinite() and oracle["quality"][0, [0, 2]].isinf().all()
    assert oracle["quality"][1].isinf().all() and not oracle["label_map"][1].any()
    assert set(oracle["label_map"][0].unique().tolist()) <= {0, 2}
    assert auto["label_map"].shape == (2, 1, H * 4, W * 4)
    assert auto["quality"].isfinite().all() and auto["has_entry"].all()
    # the oracle's class-2 mask is the auto protocol's class-2 mask where class 2 is labelled
    assert set(auto["label_map"].unique().tolist()) <= set(range(NUM_CLASSES + 1))


# ---------------------------------------------------------------------------------------------- handlers
class TinyData(torch.utils.data.Dataset):
    def __init__(self, n=6):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = torch.randn(n, 1, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"image": self.x[index], "label": self.y[index]}


def make_trainer(checkpoint_dir, max_epochs, seed, resume=True):
    torch.manual_seed(seed)
    network = nn.Linear(4, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=torch.utils.data.DataLoader(TinyData(), batch_size=2),
        network=network,
        optimizer=optimizer,
        loss_function=nn.MSELoss(),
    )
    state = TrainingState(str(checkpoint_dir), save_dict={"model": network, "optimizer": optimizer}, resume=resume)
    state.attach(trainer)
    epochs = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: epochs.append(engine.state.epoch))
    return trainer, network, optimizer, state, epochs


def test_training_state_resumes(tmp_path):
    checkpoint_dir = tmp_path / "training_state"
    trainer, network, optimizer, state, epochs = make_trainer(checkpoint_dir, max_epochs=2, seed=0)
    assert state.latest_checkpoint() is None
    trainer.run()
    assert epochs == [1, 2]
    assert sorted(os.listdir(checkpoint_dir)) == ["checkpoint_epoch=2.pt"]  # n_saved=1
    assert state.latest_checkpoint().endswith("checkpoint_epoch=2.pt")
    trained = {k: v.clone() for k, v in network.state_dict().items()}
    adam_steps = optimizer.state_dict()["state"][0]["step"]

    trainer, network, optimizer, _, epochs = make_trainer(checkpoint_dir, max_epochs=3, seed=1)
    assert not torch.equal(network.weight, trained["weight"])  # another initialisation
    restored = {}

    @trainer.on(Events.EPOCH_STARTED)
    def record(engine):
        restored.setdefault("model", {k: v.clone() for k, v in network.state_dict().items()})
        restored.setdefault("step", optimizer.state_dict()["state"][0]["step"].clone())
        restored.setdefault("epoch", engine.state.epoch)

    trainer.run()
    assert epochs == [3]  # one more epoch only
    assert restored["epoch"] == 3
    for key, value in trained.items():
        torch.testing.assert_close(restored["model"][key], value)
    assert int(restored["step"]) == int(adam_steps)
    assert trainer.state.epoch == 3 and trainer.state.max_epochs == 3
    assert sorted(os.listdir(checkpoint_dir)) == ["checkpoint_epoch=3.pt"]


def test_training_state_skips_truncated_checkpoint(tmp_path):
    """A run killed while saving (MONAI's saver writes in place) leaves a truncated newest file:
    resuming falls back to the previous complete one, and the next save replaces the truncated one."""
    checkpoint_dir = tmp_path / "training_state"
    make_trainer(checkpoint_dir, max_epochs=2, seed=0)[0].run()
    complete = checkpoint_dir / "checkpoint_epoch=2.pt"
    (checkpoint_dir / "checkpoint_epoch=3.pt").write_bytes(complete.read_bytes()[: complete.stat().st_size // 2])
    trainer, _, _, state, epochs = make_trainer(checkpoint_dir, max_epochs=3, seed=1)
    assert state.latest_checkpoint() == str(complete)
    trainer.run()
    assert epochs == [3]
    assert sorted(os.listdir(checkpoint_dir)) == ["checkpoint_epoch=3.pt"]
    assert torch.load(checkpoint_dir / "checkpoint_epoch=3.pt", weights_only=False)["trainer"]["iteration"] == 9


def test_training_state_keeps_previous_until_next_is_written(tmp_path, monkeypatch):
    """While epoch N is being written, the file of epoch N-1 must still exist (a kill then can resume)."""
    from scripts.engine import checkpoints

    checkpoint_dir = tmp_path / "training_state"
    seen = []
    original = checkpoints._AtomicDiskSaver.__call__

    def spy(self, checkpoint, filename, metadata=None):
        seen.append(("writing", filename, sorted(os.listdir(self.disk_saver.dirname))))
        return original(self, checkpoint, filename, metadata)

    monkeypatch.setattr(checkpoints._AtomicDiskSaver, "__call__", spy)  # the training state's atomic writer
    trainer, *_ = make_trainer(checkpoint_dir, max_epochs=3, seed=0)

    @trainer.on(Events.EPOCH_COMPLETED)
    def files(engine):  # attached after TrainingState: runs after the save and the clean-up
        seen.append(sorted(os.listdir(checkpoint_dir)))

    trainer.run()
    assert seen == [
        ("writing", "checkpoint_epoch=1.pt", []),
        ["checkpoint_epoch=1.pt"],
        ("writing", "checkpoint_epoch=2.pt", ["checkpoint_epoch=1.pt"]),
        ["checkpoint_epoch=2.pt"],
        ("writing", "checkpoint_epoch=3.pt", ["checkpoint_epoch=2.pt"]),
        ["checkpoint_epoch=3.pt"],
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_checkpoint_that_cannot_be_written_is_named_and_leaves_no_half_written_file(tmp_path):
    """Checkpoints are written under a temporary name and moved into place: a full disk (the temporary file's
    writes go to /dev/full) stops the run naming the file, and no checkpoint_epoch=1.pt, whole or partial, is left."""
    from scripts.engine.checkpoints import CheckpointWriteError
    from scripts.errors import user_error_in

    checkpoint_dir = tmp_path / "training_state"
    checkpoint_dir.mkdir()
    os.symlink("/dev/full", checkpoint_dir / "checkpoint_epoch=1.pt.tmp")
    trainer = make_trainer(checkpoint_dir, max_epochs=1, seed=0)[0]
    with pytest.raises(Exception) as error:
        trainer.run()
    found = user_error_in(error.value)
    assert isinstance(found, CheckpointWriteError), error.value
    assert str(checkpoint_dir / "checkpoint_epoch=1.pt") in str(found) and "Free space" in str(found)
    assert os.listdir(checkpoint_dir) == []


def test_training_state_without_resume_starts_afresh(tmp_path):
    checkpoint_dir = tmp_path / "training_state"
    make_trainer(checkpoint_dir, max_epochs=1, seed=0)[0].run()
    trainer, _, _, state, epochs = make_trainer(checkpoint_dir, max_epochs=2, seed=0, resume=False)
    trainer.run()
    assert epochs == [1, 2]
    assert sorted(os.listdir(checkpoint_dir)) == ["checkpoint_epoch=2.pt"]


def test_augmentation_version_handler():
    class Recorder:
        version, epochs = 0, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)
            self.version = epoch % 2

        def __len__(self):
            return 1

    dataset = Recorder()
    engine = Engine(lambda engine, batch: None)
    AugmentationVersionHandler(dataset).attach(engine)
    engine.run([0], max_epochs=3)
    assert dataset.epochs == [0, 1, 2]  # 0-based epochs


class VersionedSamples(torch.utils.data.Dataset):
    """A training set whose sample list changes length with the epoch (as augmentation versions do)."""

    def __init__(self, lengths):
        self.lengths, self.version = lengths, 0
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.version = epoch
        self.samples = [(epoch, i) for i in range(self.lengths[epoch % len(self.lengths)])]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        # IndexError if the index belongs to another epoch's list
        epoch, i = self.samples[index]
        return {"image": torch.tensor([float(epoch), float(i)]), "label": torch.zeros(1)}


def test_augmentation_version_handler_epoch_length_follows_the_version():
    """An augmented version can hold more or fewer (frame, class) samples than version 0 (a crop drops an
    instrument): every epoch reads its own sample list, each sample once, as the original's loader rebuilt
    every epoch does."""
    lengths = [6, 3, 8, 2]
    dataset = VersionedSamples(lengths)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True)
    seen = []
    engine = Engine(lambda engine, batch: seen.append((engine.state.epoch, tuple(batch["image"][0].int().tolist()))))
    AugmentationVersionHandler(dataset).attach(engine)
    engine.run(loader, max_epochs=4)
    for epoch in range(1, 5):
        batches = [sample for e, sample in seen if e == epoch]
        assert sorted(batches) == [(epoch - 1, i) for i in range(lengths[epoch - 1])]  # each sample once
    assert engine.state.epoch == 4 and engine.state.iteration == sum(lengths)


def _versioned_trainer(checkpoint_dir, lengths, max_epochs, seen):
    network = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    dataset = VersionedSamples(lengths)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True),
        network=network,
        optimizer=optimizer,
        loss_function=nn.MSELoss(),
    )
    AugmentationVersionHandler(dataset).attach(trainer)
    TrainingState(str(checkpoint_dir), save_dict={"model": network, "optimizer": optimizer}).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.epoch))
    return trainer


def test_variable_epoch_lengths_run_every_epoch_and_resume(tmp_path):
    # the last epochs are short: ignite's own test iteration >= epoch_length * max_epochs, with the last
    # epoch's length, would end the run after epoch 4 (32 >= 2 * 5); a resume would derive the epoch as
    # iteration // epoch_length
    lengths = [20, 20, 20, 4, 4, 4]  # samples; batches of 2: 10, 10, 10, 2, 2, 2
    seen = []
    trainer = _versioned_trainer(tmp_path / "state", lengths, 5, seen)
    trainer.run()
    assert trainer.state.epoch == 5 and trainer.state.iteration == 34
    assert [seen.count(e) for e in range(1, 6)] == [10, 10, 10, 2, 2]
    resumed_seen = []
    resumed = _versioned_trainer(tmp_path / "state", lengths, 6, resumed_seen)
    resumed.run()
    assert resumed_seen == [6, 6]  # one more epoch, of its own length
    assert resumed.state.epoch == 6 and resumed.state.iteration == 36
    saved = torch.load(tmp_path / "state" / "checkpoint_epoch=6.pt", weights_only=True)
    assert saved["trainer_progress"] == {"epoch": 6, "iteration": 36}


def test_training_state_resumes_a_state_saved_without_progress(tmp_path):
    """Training states of bundles before 0.4 (fixed epoch length) hold no progress entry: ignite's own
    epoch is right for them."""
    checkpoint_dir = tmp_path / "training_state"
    make_trainer(checkpoint_dir, max_epochs=2, seed=0)[0].run()
    path = checkpoint_dir / "checkpoint_epoch=2.pt"
    state = torch.load(path, weights_only=True)
    del state["trainer_progress"]
    torch.save(state, path)
    trainer, _, _, _, epochs = make_trainer(checkpoint_dir, max_epochs=3, seed=1)
    trainer.run()
    assert epochs == [3] and trainer.state.iteration == 9


def _one_sgd_step(max_norm, accumulation_steps=1):
    """One SGD step (lr 1) of w . x with w = 0 and x = (3, 4): the gradient is (3, 4), of norm 5."""
    network = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(network.weight)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.tensor([[3.0, 4.0]]), "label": torch.zeros(1, 1)}],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=1.0),
        loss_function=lambda pred, label: pred.sum(),
        accumulation_steps=accumulation_steps,
    )
    clipping = GradientNormClipping(max_norm)
    clipping.attach(trainer)
    trainer.run()
    return network.weight.detach().flatten().tolist(), clipping


def test_gradient_norm_clipping_scales_the_step():
    weight, clipping = _one_sgd_step(max_norm=1.0)
    assert weight == pytest.approx([-0.6, -0.8])  # (3, 4) / 5
    assert clipping.last_norm == pytest.approx(5.0)  # the norm before clipping


def test_gradient_norm_clipping_leaves_small_gradients_and_can_be_off():
    assert _one_sgd_step(max_norm=10.0)[0] == pytest.approx([-3.0, -4.0])
    weight, clipping = _one_sgd_step(max_norm=None)
    assert weight == pytest.approx([-3.0, -4.0]) and clipping.last_norm is None  # not attached


def test_gradient_norm_clipping_refuses_accumulation():
    with pytest.raises(ValueError, match="gradient accumulation"):
        _one_sgd_step(max_norm=1.0, accumulation_steps=2)


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_report_writes_json(tmp_path, capsys):
    output_file = tmp_path / "eval" / "metrics_auto.json"
    report = MetricsReport(str(output_file), protocol="auto", extra={"model_file": "m.pt"})
    engine = Engine(lambda engine, batch: None)
    report.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def set_metrics(engine):
        engine.state.metrics.update(
            {
                "challenge_iou": 50.0,
                "iou": 40.0,
                "mc_iou": float("nan"),
                "miou": 30.0,
                "class_iou": {"A": 60.0, "B": float("nan")},
                "num_frames": 2,
            }
        )

    engine.run([0], max_epochs=1)
    with open(output_file) as handle:
        result = json.load(handle)
    assert result["protocol"] == "auto"
    assert result["challenge_iou"] == 50.0 and result["iou"] == 40.0 and result["miou"] == 30.0
    assert math.isnan(result["mc_iou"])
    assert result["class_iou"]["A"] == 60.0 and math.isnan(result["class_iou"]["B"])
    assert result["num_frames"] == 2 and result["model_file"] == "m.pt"
    printed = capsys.readouterr().out
    assert "protocol: auto" in printed and "n/a" in printed


# ------------------------------------------------------------------------------------------ input checks
def test_check_training_inputs_lists_every_problem(tmp_path):
    dataset_dir = str(tmp_path / "no_data")
    checkpoint = str(tmp_path / "models" / "sam_vit_h_4b8939.pth")
    with pytest.raises(FileNotFoundError) as error:
        check_training_inputs(dataset_dir, "vit_h", checkpoint, str(tmp_path / "cache"))
    message = str(error.value)
    assert dataset_dir in message and "surgical-sam prepare_custom" in message
    assert checkpoint in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in message
    assert message.count("\n  - ") == 2  # both problems, at once


def test_check_training_inputs_missing_checkpoint_only(tmp_path, small_demo_dir):
    checkpoint = str(tmp_path / "sam_tiny.pth")
    with pytest.raises(FileNotFoundError) as error:
        check_training_inputs(small_demo_dir, "tiny", checkpoint, str(tmp_path / "cache"))
    message = str(error.value)
    assert checkpoint in message and "make_sam_checkpoint" in message
    assert "dataset:" not in message and message.count("\n  - ") == 1


def test_check_training_inputs_missing_cache(tmp_path, small_demo_dir, small_sam_checkpoint):
    cache_dir = str(tmp_path / "no_cache")
    with pytest.raises(FileNotFoundError) as error:
        check_training_inputs(small_demo_dir, "tiny", small_sam_checkpoint, cache_dir, config_hint="my.yaml")
    message = str(error.value)
    assert cache_dir in message and "monai.bundle run precompute" in message and "my.yaml" in message


def test_check_training_inputs_stale_cache(tmp_path, small_demo_dir, small_cache_dir):
    from scripts.sam.backbone import save_random_sam_checkpoint

    other = save_random_sam_checkpoint(str(tmp_path / "other.pth"), "tiny", seed=1)
    with pytest.raises(StaleCacheError, match="sam_checkpoint_md5") as error:
        check_training_inputs(small_demo_dir, "tiny", other, small_cache_dir)
    assert "--cache_dir NEW_FOLDER" in str(error.value) and "monai.bundle run precompute" in str(error.value)


def test_check_training_inputs_ok(small_demo_dir, small_sam_checkpoint, small_cache_dir):
    check_training_inputs(small_demo_dir, "tiny", small_sam_checkpoint, small_cache_dir)
    check_training_inputs(
        small_demo_dir, "tiny", small_sam_checkpoint, small_cache_dir, splits=["training", "validation"]
    )


def test_check_training_inputs_split_not_in_cache(small_demo_dir, small_sam_checkpoint, small_cache_dir):
    with pytest.raises(FileNotFoundError, match="no 'fold2_training' split") as error:
        check_training_inputs(
            small_demo_dir, "tiny", small_sam_checkpoint, small_cache_dir, splits=["fold2_training", "validation"]
        )
    assert "monai.bundle run precompute" in str(error.value)


def test_check_evaluation_inputs_missing_model(tmp_path, small_demo_dir, small_sam_checkpoint, small_cache_dir):
    model_file = str(tmp_path / "models" / "model.pt")
    with pytest.raises(FileNotFoundError) as error:
        check_evaluation_inputs(small_demo_dir, "tiny", small_sam_checkpoint, small_cache_dir, model_file)
    message = str(error.value)
    assert message.startswith("cannot evaluate") and model_file in message and "Train first" in message
    os.makedirs(os.path.dirname(model_file))
    torch.save({}, model_file)
    check_evaluation_inputs(small_demo_dir, "tiny", small_sam_checkpoint, small_cache_dir, model_file)


def test_check_evaluation_inputs_lists_model_with_other_problems(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        check_evaluation_inputs(
            str(tmp_path / "d"), "tiny", str(tmp_path / "s.pth"), str(tmp_path / "c"), str(tmp_path / "model.pt")
        )
    message = str(error.value)
    assert "model.pt" in message and "dataset.json missing" in message and "s.pth" in message


# ------------------------------------------------------------------------------ the micro-batched step
def _tiny_training_batch(batch, num_classes, seed=0):
    from scripts.measurement.benchmark_workers import model_and_data

    cfg = dict(
        batch_size=batch,
        num_classes=num_classes,
        num_tokens=2,
        frame_size=[40, 56],
        inference_frames=1,
        sam_variant="tiny",
        seed=seed,
    )
    model, embeddings, targets, _ = model_and_data(cfg, torch.device("cpu"))
    if batch > 2:  # an absent-class prompt (empty target) and a sample whose grid mask is empty
        targets["mask"][0] = 0
        targets["grid_mask"][0] = False
        targets["grid_mask"][2] = False
    return model.train(), embeddings, targets


def _gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("batch", "num_classes", "micro_batch_size"), [(5, 3, 2), (5, 3, 1), (4, 1, 3), (1, 2, 1), (3, 2, 8)]
)
def test_micro_batched_backward_equals_the_whole_batch(batch, num_classes, micro_batch_size):
    """Slices of the batch through forward and backward, the contrastive term once over the whole batch:
    the whole batch's loss (<= 1e-5) and gradients (<= 1e-4 relative), also with absent-class prompts,
    empty grid masks, uneven slices, C = 1 and batch 1. In float64, so that the parameters whose exact
    gradient is 0 (the attention keys' biases) show 0 up to rounding, not float32 noise."""
    from scripts.surgical_sam.batches import micro_batched_backward
    from scripts.surgical_sam.loss import SurgicalSAMLoss

    loss_fn = SurgicalSAMLoss()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _float64_gradients_equal(batch, num_classes, micro_batch_size, loss_fn, micro_batched_backward)
    finally:
        torch.set_default_dtype(default_dtype)


def _float64_gradients_equal(batch, num_classes, micro_batch_size, loss_fn, micro_batched_backward):
    model, embeddings, targets = _tiny_training_batch(batch, num_classes)
    use_float64_dense_pe(model)
    plain_pred = model(embeddings, targets["class_id"])
    plain_loss = loss_fn(plain_pred, targets)
    plain_loss.backward()
    expected = _gradients(model)
    model.zero_grad(set_to_none=True)
    loss, pred = micro_batched_backward(
        model, loss_fn, embeddings, targets, {"class_ids": targets["class_id"]}, micro_batch_size
    )
    assert not loss.requires_grad
    assert abs(float(loss) - float(plain_loss)) <= 1e-5 * max(1.0, abs(float(plain_loss)))
    got = _gradients(model)
    assert set(got) == set(expected) and expected
    for name, grad in expected.items():
        scale = max(float(grad.abs().max()), 1e-12)
        assert float((got[name] - grad).abs().max()) / scale <= 1e-4, name
    assert pred["logits"].shape == plain_pred["logits"].shape
    assert torch.allclose(pred["logits"], plain_pred["logits"].detach(), atol=1e-5)
    assert torch.equal(pred["prototypes"], plain_pred["prototypes"].detach())


def test_micro_batched_backward_refuses_a_loss_that_does_not_split():
    from scripts.surgical_sam.batches import micro_batched_backward

    model, embeddings, targets = _tiny_training_batch(2, 2)
    with pytest.raises(TypeError, match="micro_batch_size: null"):
        micro_batched_backward(model, nn.MSELoss(), embeddings, targets, {"class_ids": targets["class_id"]}, 1)
    with pytest.raises(ValueError, match="positive"):
        MicroBatchIteration(0)


def _one_trainer_iteration(micro_batch_size, accumulation_steps=1):
    from scripts.engine.inferers import AutocastInferer
    from scripts.surgical_sam.loss import SurgicalSAMLoss

    model, embeddings, targets = _tiny_training_batch(5, 3)
    batch = [
        {
            "image_embeddings": embeddings[i],
            "mask": targets["mask"][i],
            "grid_mask": targets["grid_mask"][i],
            "class_id": targets["class_id"][i],
        }
        for i in range(5)
    ]
    loader = torch.utils.data.DataLoader(batch, batch_size=5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=SurgicalSAMLoss(),
        prepare_batch=PromptedSampleBatch(),
        inferer=AutocastInferer(),
        iteration_update=None if micro_batch_size == "monai" else MicroBatchIteration(micro_batch_size),
        accumulation_steps=accumulation_steps,
        decollate=False,
    )
    seen = []
    clipping = GradientNormClipping(max_norm=1e9)
    clipping.attach(trainer)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: seen.append(
            (float(engine.state.output["loss"]), engine.state.output["pred"]["logits"].shape[0], clipping.last_norm)
        ),
    )
    trainer.run()
    return seen, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_micro_batch_iteration_in_monai_trainer_equals_monai_iteration():
    """MONAI's SupervisedTrainer with MicroBatchIteration (slices of 2) and with its own iteration: the same
    loss, the same gradient norm seen after the backward, the same parameters after the SGD step."""
    (monai_record,), monai_params = _one_trainer_iteration("monai")
    (micro_record,), micro_params = _one_trainer_iteration(2)
    assert abs(micro_record[0] - monai_record[0]) <= 1e-5 * abs(monai_record[0])
    assert micro_record[1] == monai_record[1] == 5
    assert abs(micro_record[2] - monai_record[2]) <= 1e-4 * monai_record[2]
    for name, value in monai_params.items():
        assert float((micro_params[name] - value).abs().max()) <= 1e-5, name
    with pytest.raises(ValueError, match="accumulation_steps"):
        _one_trainer_iteration(2, accumulation_steps=2)


def test_epoch_progress_counts_the_samples_of_a_decollated_batch(caplog):
    """MONAI's trainer decollates ``engine.state.batch`` into per-sample dicts after each iteration: the rate
    counts those samples (it counted each sample's first dimension, 256 embedding channels, 16x too many)."""
    from scripts.engine.progress import EpochProgress

    data = [{"image": torch.randn(256, 2, 2), "label": torch.randn(1)} for _ in range(10)]
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 1))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
    )
    progress = EpochProgress()
    progress.attach(trainer)
    with caplog.at_level(logging.INFO, logger="scripts.engine.progress"):
        trainer.run()
    assert isinstance(trainer.state.batch, list)  # decollated, as in every training run
    assert progress.samples == 10 and progress.iterations == 3
    assert "epoch 1/1: loss" in caplog.text and "(mean of 3 iterations)" in caplog.text
