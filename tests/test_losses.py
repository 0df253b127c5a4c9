"""Tests of scripts.surgical_sam.loss against the SurgicalSAM paper's losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scripts.surgical_sam.loss import (
    PrototypeContrastiveLoss,
    SurgicalSAMLoss,
    class_embeddings_from_masks,
    surgical_sam_dice_loss,
)


def reference_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's Dice written out: per sample d = 2 sum(pt) / ((sum p^2 + 1e-3) + (sum t^2 + 1e-3))."""
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = 2 * (probabilities * target).sum(1) / ((probabilities.pow(2).sum(1) + 1e-3) + (target.pow(2).sum(1) + 1e-3))
    return (1 - dice).mean()


def reference_pcl(prototypes, embeddings, class_ids, temperature) -> float:
    """Float64 python reference of the PCL ("code" form) with a max-shifted log-sum-exp."""
    prototypes = prototypes.double()
    embeddings = embeddings.double()
    ids = [int(i) for i in class_ids]

    def cosine(a, b):
        return float((a @ b) / (a.norm() * b.norm()))

    losses = []
    for b, c in enumerate(ids):
        positive = cosine(prototypes[c - 1], embeddings[b]) / temperature
        terms = [positive] + [
            cosine(prototypes[c - 1], embeddings[other]) / temperature
            for other, other_class in enumerate(ids)
            if other_class != c
        ]
        largest = max(terms)
        log_denominator = largest + math.log(sum(math.exp(term - largest) for term in terms))
        losses.append(log_denominator - positive)
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- Dice


def test_dice_loss_hand_computed_2x2():
    # Logits 0 -> p = 0.5 everywhere.
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0: sum(pt) = 0.5, sum(p^2) = 1, sum(t^2) = 1 -> d = 1 / 2.002
    # sample 1: sum(pt) = 2,   sum(p^2) = 1, sum(t^2) = 4 -> d = 4 / 5.002
    expected = ((1 - 1 / 2.002) + (1 - 4 / 5.002)) / 2
    loss = surgical_sam_dice_loss()(logits, target)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_equals_spec_formula_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 13, 17, generator=generator, dtype=torch.float64) * 3
    target = (torch.rand(5, 1, 13, 17, generator=generator, dtype=torch.float64) > 0.6).double()
    target[1] = 0  # an empty target is still well defined
    loss = surgical_sam_dice_loss()(logits, target)
    torch.testing.assert_close(loss, reference_dice_loss(logits, target), rtol=1e-12, atol=1e-12)

    logits32 = logits.float().requires_grad_()
    loss32 = surgical_sam_dice_loss()(logits32, target.float())
    torch.testing.assert_close(loss32, reference_dice_loss(logits32, target.float()), rtol=1e-5, atol=1e-6)
    loss32.backward()
    assert torch.isfinite(logits32.grad).all()


# --------------------------------------------------------------------------- class embeddings


def test_class_embeddings_from_masks():
    embeddings = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    grid_masks = torch.tensor([[[True, False], [False, True]], [[False, False], [False, False]]])
    pooled, valid = class_embeddings_from_masks(embeddings, grid_masks)
    assert pooled.shape == (2, 3)
    assert valid.tolist() == [True, False]
    expected = (embeddings[0, :, 0, 0] + embeddings[0, :, 1, 1]) / 2
    torch.testing.assert_close(pooled[0], expected)
    torch.testing.assert_close(pooled[1], torch.zeros(3))
    # (B, 1, h, w) float masks give the same result.
    pooled_4d, valid_4d = class_embeddings_from_masks(embeddings, grid_masks[:, None].float())
    torch.testing.assert_close(pooled_4d, pooled)
    assert valid_4d.tolist() == valid.tolist()
    with pytest.raises(ValueError):
        class_embeddings_from_masks(embeddings, torch.ones(2, 3, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- PCL


def test_pcl_hand_computed():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    class_ids = torch.tensor([1, 2, 1])
    temperature = 0.5
    root_half = 1 / math.sqrt(2)  # cosine between (1, 1) and either axis
    # sample 0, class 1: positive s=1; negative sample 1 with s(1, 1) = 0
    loss_0 = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + math.exp(0.0)))
    # sample 1, class 2: positive s=1; negatives samples 0 (s=0) and 2 (s=1/sqrt 2)
    loss_1 = -math.log(
        math.exp(1 / temperature) / (math.exp(1 / temperature) + math.exp(0.0) + math.exp(root_half / temperature))
    )
    # sample 2, class 1: positive s=1/sqrt 2; negative sample 1 with s=0
    loss_2 = -math.log(math.exp(root_half / temperature) / (math.exp(root_half / temperature) + math.exp(0.0)))
    expected = (loss_0 + loss_1 + loss_2) / 3
    loss = PrototypeContrastiveLoss(temperature=temperature)(prototypes, embeddings, class_ids)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(reference_pcl(prototypes, embeddings, class_ids, temperature), rel=1e-12)


def test_pcl_valid_mask_drops_samples():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 0.0]])
    class_ids = torch.tensor([1, 2, 1, 99])  # the invalid sample's id is never read
    valid = torch.tensor([True, True, False, False])
    loss = PrototypeContrastiveLoss(0.5)(prototypes, embeddings, class_ids, valid)
    expected = reference_pcl(prototypes, embeddings[:2], class_ids[:2], 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pcl_single_class_or_no_valid_sample_is_zero_with_graph():
    prototypes = torch.randn(3, 4, requires_grad=True)
    embeddings = torch.randn(4, 4, requires_grad=True)
    loss_fn = PrototypeContrastiveLoss()
    one_class = loss_fn(prototypes, embeddings, torch.tensor([2, 2, 2, 2]))
    assert one_class.item() == 0.0
    one_class.backward()
    assert prototypes.grad is not None and torch.all(prototypes.grad == 0)
    # Only one class among the valid samples.
    mixed = loss_fn(prototypes, embeddings, torch.tensor([2, 3, 2, 1]), torch.tensor([True, False, True, False]))
    assert mixed.item() == 0.0
    nothing = loss_fn(prototypes, embeddings, torch.tensor([1, 2, 3, 1]), torch.zeros(4, dtype=torch.bool))
    assert nothing.item() == 0.0
    assert nothing.requires_grad


def test_pcl_is_stable_for_small_temperature_and_large_vectors():
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(4, 32, generator=generator) * 1e20
    embeddings = torch.randn(9, 32, generator=generator) * 1e25
    class_ids = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, 1])
    temperature = 1e-3
    loss = PrototypeContrastiveLoss(temperature)(prototypes, embeddings, class_ids)
    assert torch.isfinite(loss)
    expected = reference_pcl(prototypes, embeddings, class_ids, temperature)
    # s / t is ~1e3 here, so float32 rounding of the cosines (~1e-7) is amplified to ~1e-4 absolute.
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-3)
    loss64 = PrototypeContrastiveLoss(temperature)(prototypes.double(), embeddings.double(), class_ids)
    assert loss64.item() == pytest.approx(expected, rel=1e-9)


def test_pcl_matches_reference_on_random_inputs_and_gradient_reaches_prototypes():
    generator = torch.Generator().manual_seed(2)
    prototypes = torch.randn(5, 16, generator=generator, dtype=torch.float64).requires_grad_()
    embeddings = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    class_ids = torch.randint(1, 6, (12,), generator=generator)
    loss = PrototypeContrastiveLoss(0.07)(prototypes, embeddings, class_ids)
    assert loss.item() == pytest.approx(reference_pcl(prototypes.detach(), embeddings, class_ids, 0.07), rel=1e-10)
    loss.backward()
    used_rows = sorted(set(class_ids.tolist()))
    assert prototypes.grad.abs().sum() > 0
    for row in range(5):
        if row + 1 in used_rows:
            assert prototypes.grad[row].abs().sum() > 0


def test_pcl_rejects_out_of_range_class_ids():
    with pytest.raises(ValueError):
        PrototypeContrastiveLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        PrototypeContrastiveLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 3]))


# --------------------------------------------------------------------------- total loss


def make_batch(masks: torch.Tensor, num_classes: int = 3, dim: int = 8, grid: int = 4, seed: int = 3):
    """A batch with full-frame masks (B, 1, H, W) and grid masks obtained by max-pooling them."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, _, height, width = masks.shape
    logits = torch.randn(batch_size, 1, height, width, generator=generator, requires_grad=True)
    image_embeddings = torch.randn(batch_size, dim, grid, grid, generator=generator)
    prototypes = torch.randn(num_classes, dim, generator=generator, requires_grad=True)
    grid_mask = F.adaptive_max_pool2d(masks, grid) > 0
    class_id = (torch.arange(batch_size) % num_classes) + 1
    pred = {"logits": logits, "image_embeddings": image_embeddings, "prototypes": prototypes}
    target = {"mask": masks, "grid_mask": grid_mask, "class_id": class_id}
    return pred, target


def test_total_loss_without_absent_samples_is_dice_plus_pcl():
    generator = torch.Generator().manual_seed(4)
    masks = (torch.rand(4, 1, 16, 16, generator=generator) > 0.5).float()
    pred, target = make_batch(masks)
    total = SurgicalSAMLoss()(pred, target)
    dice = surgical_sam_dice_loss()(pred["logits"], target["mask"])
    pooled, valid = class_embeddings_from_masks(pred["image_embeddings"], target["grid_mask"][:, 0])
    pcl = PrototypeContrastiveLoss(0.07)(pred["prototypes"], pooled, target["class_id"], valid)
    assert pcl.item() > 0
    assert torch.equal(total.detach(), (dice + pcl).detach())  # exactly the paper's L = Dice + PCL
    total.backward()
    assert pred["prototypes"].grad.abs().sum() > 0
    assert pred["logits"].grad.abs().sum() > 0


def test_total_loss_with_absent_samples():
    generator = torch.Generator().manual_seed(5)
    masks = (torch.rand(5, 1, 16, 16, generator=generator) > 0.5).float()
    masks[[1, 3]] = 0  # absent-class prompts
    pred, target = make_batch(masks)
    loss_fn = SurgicalSAMLoss(dice_weight=2.0, pcl_weight=0.5, absent_weight=3.0, temperature=0.1)
    total = loss_fn(pred, target)

    present = torch.tensor([0, 2, 4])
    absent = torch.tensor([1, 3])
    logits = pred["logits"]
    dice = reference_dice_loss(logits[present], masks[present])
    pooled, valid = class_embeddings_from_masks(pred["image_embeddings"], target["grid_mask"])
    assert valid.tolist() == [True, False, True, False, True]
    pcl = reference_pcl(pred["prototypes"].detach(), pooled[present], target["class_id"][present], 0.1)
    # BCE with logits against 0 is softplus(x); mean over pixels then over the absent samples.
    absent_term = F.softplus(logits[absent]).flatten(1).mean(1).mean()
    expected = 2.0 * dice.item() + 0.5 * pcl + 3.0 * absent_term.item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert pred["logits"].grad[absent].abs().sum() > 0


def test_total_loss_all_absent_is_only_bce():
    masks = torch.zeros(2, 1, 8, 8)
    pred, target = make_batch(masks)
    total = SurgicalSAMLoss()(pred, target)
    expected = F.softplus(pred["logits"]).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert torch.all(pred["prototypes"].grad == 0)


def indexed_surgical_sam_loss(pred, target, absent_weight=1.0):
    """The loss with the absent and invalid samples indexed out (data-dependent shapes), as before the
    weighted form that never waits for the device."""
    logits, mask = pred["logits"], target["mask"]
    has_target = mask.flatten(1).sum(1) > 0
    total = surgical_sam_dice_loss()(logits[has_target], mask[has_target]) if has_target.any() else 0.0
    pooled, valid = class_embeddings_from_masks(pred["image_embeddings"], target["grid_mask"])
    if valid.any():
        total = total + PrototypeContrastiveLoss(0.07)(pred["prototypes"], pooled[valid], target["class_id"][valid])
    if (~has_target).any():
        bce = F.binary_cross_entropy_with_logits(
            logits[~has_target], torch.zeros_like(logits[~has_target]), reduction="none"
        )
        total = total + absent_weight * bce.flatten(1).mean(1).mean()
    return total


@pytest.mark.parametrize("absent", [[], [1, 3], [0]])
def test_weighted_loss_equals_the_indexed_one_with_gradients(absent):
    generator = torch.Generator().manual_seed(7)
    masks = (torch.rand(5 if absent != [0] else 1, 1, 16, 16, generator=generator) > 0.5).float()
    masks[absent] = 0
    results = []
    for loss_fn in (SurgicalSAMLoss(), indexed_surgical_sam_loss):
        pred, target = make_batch(masks.clone())
        pred["image_embeddings"].requires_grad_()
        loss = loss_fn(pred, target)
        loss.backward()
        grads = [pred[k].grad for k in ("logits", "image_embeddings", "prototypes")]
        # no valid sample: the indexed loss leaves no gradient, the weighted one a zero gradient
        results.append(
            [loss.detach()]
            + [
                torch.zeros_like(pred[k]) if g is None else g
                for k, g in zip(("logits", "image_embeddings", "prototypes"), grads)
            ]
        )
    for fast, plain in zip(*results):
        assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-7)


def _monai_squared_dice(reduction):
    from monai.losses import DiceLoss

    return DiceLoss(
        include_background=True,
        sigmoid=True,
        squared_pred=True,
        smooth_nr=0.0,
        smooth_dr=2e-3,
        batch=False,
        reduction=reduction,
    )


@pytest.mark.parametrize("shape", [(3, 1, 13, 17), (2, 3, 9, 11), (2, 2, 5, 6, 7), (1, 1, 1, 1)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dice_loss_equals_monais_squared_dice_in_float64(shape, reduction):
    # the same equation as MONAI's DiceLoss(squared_pred=True) with these constants: values, shapes, gradients
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(*shape, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    target = (torch.rand(*shape, generator=generator, dtype=torch.float64) > 0.5).double()
    target[0] = 0  # an empty target
    ours = surgical_sam_dice_loss(reduction)(logits, target)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    logits_monai = logits.detach().clone().requires_grad_()
    theirs = _monai_squared_dice(reduction)(logits_monai, target)
    (grad_monai,) = torch.autograd.grad(theirs.sum(), logits_monai)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_monai, rtol=1e-10, atol=1e-14)


def test_dice_loss_gradient_rounds_less_than_monais_in_float32():
    # MONAI sums p*t as (|p|^2 + |t|^2 - |p - t|^2) / 2: on full frames its float32 gradient carries the
    # rounding of those large sums; the direct sums' gradient is closer to float64 (model card: ~5x in RMS)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 512, 640, generator=generator, dtype=torch.float64)
    target = torch.zeros_like(logits)
    target[:, :, 100:400, 200:500] = 1

    def gradient(loss, dtype):
        x = logits.detach().to(dtype).clone().requires_grad_()
        loss(x, target.to(dtype)).backward()
        return x.grad.double()

    ours, monai_loss = surgical_sam_dice_loss(), _monai_squared_dice("mean")
    exact = gradient(ours, torch.float64)
    torch.testing.assert_close(exact, gradient(monai_loss, torch.float64), rtol=1e-9, atol=1e-16)
    rms = {
        name: float((gradient(loss, torch.float32) - exact).pow(2).mean().sqrt() / exact.abs().max())
        for name, loss in (("ours", ours), ("monai", monai_loss))
    }
    assert rms["ours"] < 1e-6 and rms["ours"] * 2 < rms["monai"], rms


def test_dice_loss_refuses_mismatched_shapes_and_reductions():
    with pytest.raises(ValueError, match="differs from logits shape"):
        surgical_sam_dice_loss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="reduction must be"):
        surgical_sam_dice_loss("batch")
