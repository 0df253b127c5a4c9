"""Tests of the SurgicalSAM network (the SurgicalSAM paper's Methodology): prompt encoder, batched decoder, model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.sam.backbone import build_sam, get_variant
from scripts.sam.batched_mask_decoder import decode_masks
from scripts.sam.geometry import low_res_logits_to_frame
from scripts.surgical_sam.network import SurgicalSAM
from scripts.surgical_sam.prototype_prompt_encoder import PrototypeBank, PrototypePromptEncoder

NUM_CLASSES = 3
FRAME_SIZE = (96, 128)
TINY = get_variant("tiny")  # the small SAM these tests build
IMAGE_SIZE = TINY.image_size  # SAM input side
GRID = TINY.grid_size  # embedding grid side
LOW_RES = 4 * GRID  # side of the decoder's low-res masks
ATOL = 1e-5


def tiny_model(seed: int = 0, num_classes: int = NUM_CLASSES, num_tokens: int = 2, **kwargs) -> SurgicalSAM:
    torch.manual_seed(seed)
    return SurgicalSAM(num_classes, num_tokens, FRAME_SIZE, sam_variant="tiny", **kwargs).eval()


def embeddings(batch: int, seed: int = 1, grid: tuple[int, int] = (GRID, GRID)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(batch, 256, *grid, generator=generator)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------------------- trainable parameters
def test_trainable_parameter_count_endovis2018():
    model = SurgicalSAM(num_classes=7, num_tokens=2, frame_size=(1024, 1280), sam_variant="vit_b")
    counts = model.trainable_parameter_counts()
    assert counts == {
        "prototypes": 1792,
        "class_prompt_encoder": 590594,
        "mask_decoder": 4058340,
        "total": 4650726,
    }
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.image_encoder is None  # default: trains on cached embeddings
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in model.class_prompt_encoder.pn_cls_embeddings.parameters())
    assert all(p.requires_grad for p in model.mask_decoder.parameters())
    assert model.grid_size == (64, 64) and model.image_size == 1024
    # prototypes: nn.Embedding, N(0, 1)
    prototypes = model.prototypes()
    assert isinstance(model.prototypes.class_embeddings, nn.Embedding)
    assert prototypes.shape == (7, 256)
    assert abs(prototypes.mean().item()) < 0.15 and 0.85 < prototypes.std().item() < 1.15


def test_frozen_parts_with_image_encoder():
    model = tiny_model(with_image_encoder=True)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in model.class_prompt_encoder.pn_cls_embeddings.parameters())
    counts = model.trainable_parameter_counts()
    assert counts["total"] == counts["prototypes"] + counts["class_prompt_encoder"] + counts["mask_decoder"]
    model.train()
    assert model.training and model.mask_decoder.training
    assert not model.image_encoder.training and not model.prompt_encoder.training


# ------------------------------------------------------------------------------------ prompt encoder
def hand_encoder() -> PrototypePromptEncoder:
    """C=2, n=1, d=2 on a 1x2 grid; MLPs set so that dense = relu(F_c), token_k = sum_p relu(F_k[p])."""
    encoder = PrototypePromptEncoder(
        num_classes=2, num_tokens=1, grid_size=(1, 2), embed_dim=2, dense_hidden_dim=2, sparse_hidden_dim=2
    )
    with torch.no_grad():
        encoder.dense_fc_1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        encoder.dense_fc_1.bias.zero_()
        encoder.dense_fc_2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        encoder.dense_fc_2.bias.zero_()
        encoder.sparse_fc_1.weight.copy_(torch.eye(2).view(2, 2, 1))
        encoder.sparse_fc_1.bias.zero_()
        encoder.sparse_fc_2.weight.copy_(torch.ones(1, 2, 1))
        encoder.sparse_fc_2.bias.zero_()
        encoder.pn_cls_embeddings[0].weight.copy_(torch.tensor([[-100.0, -200.0]]))  # negative
        encoder.pn_cls_embeddings[1].weight.copy_(torch.tensor([[10.0, 20.0]]))  # positive
    return encoder


def test_prototype_prompt_encoder_by_hand():
    encoder = hand_encoder()
    # F: position 0 = (1, 2), position 1 = (0.5, -1); prototypes P_1 = (1, 0), P_2 = (0, 1).
    image = torch.tensor([[[[1.0, 0.5]], [[2.0, -1.0]]]])  # (1, d=2, h=1, w=2)
    image = image.expand(2, -1, -1, -1)  # same image, prompted with class 2 then class 1
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dense, sparse = encoder(image, prototypes, torch.tensor([2, 1]))
    # S_1 = (1, 0.5), S_2 = (2, -1)
    # F_1 = F (1 + S_1): p0 (2, 4), p1 (0.75, -1.5);  F_2 = F (1 + S_2): p0 (3, 6), p1 (0, 0)
    assert dense.shape == (2, 2, 1, 2)
    expected_dense = torch.tensor(
        [
            [[[3.0, 0.0]], [[6.0, 0.0]]],  # relu(F_2) as (d, h, w)
            [[[2.0, 0.75]], [[4.0, 0.0]]],  # relu(F_1)
        ]
    )
    assert torch.allclose(dense, expected_dense)
    # tokens before the pn embeddings: class 1 (2.75, 4), class 2 (3, 6)
    assert sparse.shape == (2, 2, 2)
    expected_sparse = torch.tensor(
        [
            [[2.75 - 100.0, 4.0 - 200.0], [3.0 + 10.0, 6.0 + 20.0]],  # class 2 prompted
            [[2.75 + 10.0, 4.0 + 20.0], [3.0 - 100.0, 6.0 - 200.0]],  # class 1 prompted
        ]
    )
    assert torch.allclose(sparse, expected_sparse)


def reference_prompt_encoder(encoder, image, prototypes, class_ids):
    """The paper's steps 1-4 written out per sample and class with explicit weights."""
    batch, dim, height, width = image.shape
    w1, b1 = encoder.dense_fc_1.weight[:, :, 0, 0], encoder.dense_fc_1.bias
    w2, b2 = encoder.dense_fc_2.weight[:, :, 0, 0], encoder.dense_fc_2.bias
    s1, c1 = encoder.sparse_fc_1.weight[:, :, 0], encoder.sparse_fc_1.bias
    s2, c2 = encoder.sparse_fc_2.weight[:, :, 0], encoder.sparse_fc_2.bias
    positive, negative = encoder.pn_cls_embeddings[1].weight, encoder.pn_cls_embeddings[0].weight
    dense_out, sparse_out = [], []
    for b in range(batch):
        features = torch.stack([image[b, :, y, x] for y in range(height) for x in range(width)])  # (h*w, d)
        tokens = []
        for k in range(prototypes.shape[0]):
            similarity = features @ prototypes[k]  # (h*w,)
            activated = features + features * similarity[:, None]
            if k + 1 == int(class_ids[b]):
                hidden = torch.relu(activated @ w1.T + b1)  # per position
                per_position = hidden @ w2.T + b2  # (h*w, d)
                dense = torch.zeros(dim, height, width)
                for y in range(height):
                    for x in range(width):
                        dense[:, y, x] = per_position[y * width + x]
                dense_out.append(dense)
            mixed = s2 @ torch.relu(s1 @ activated + c1[:, None]) + c2[:, None]  # (n, d)
            tokens.append(mixed + (positive if k + 1 == int(class_ids[b]) else negative))
        sparse_out.append(torch.cat(tokens, dim=0))
    return torch.stack(dense_out), torch.stack(sparse_out)


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (2, 2)])
def test_prototype_prompt_encoder_matches_reference_on_any_grid(grid):
    torch.manual_seed(0)
    num_classes, num_tokens, dim = 3, 2, 8
    encoder = PrototypePromptEncoder(
        num_classes, num_tokens, grid, embed_dim=dim, dense_hidden_dim=5, sparse_hidden_dim=4
    )
    with torch.no_grad():
        for embedding in encoder.pn_cls_embeddings:
            embedding.weight.normal_()
    image = torch.randn(4, dim, *grid)
    prototypes = torch.randn(num_classes, dim)
    class_ids = torch.tensor([1, 3, 2, 3])
    dense, sparse = encoder(image, prototypes, class_ids)
    assert dense.shape == (4, dim, *grid)
    assert sparse.shape == (4, num_classes * num_tokens, dim)
    expected_dense, expected_sparse = reference_prompt_encoder(encoder, image, prototypes, class_ids)
    assert torch.allclose(dense, expected_dense, atol=1e-5)
    assert torch.allclose(sparse, expected_sparse, atol=1e-5)


def plain_prompt_encoder(encoder, image, prototypes, class_ids):
    """The prompt encoder as the paper writes it: the (B, C, h*w, d) class-activated tensor, the Conv1d
    modules themselves on it, the prompted class's slice for the dense prompt."""
    batch, dim, height, width = image.shape
    features = image.flatten(2).transpose(1, 2)  # (B, h*w, d)
    similarity = torch.einsum("bpd,cd->bcp", features, prototypes).unsqueeze(-1)
    activated = features.unsqueeze(1) + features.unsqueeze(1) * similarity  # (B, C, h*w, d)
    index = class_ids.long() - 1
    prompted = activated[torch.arange(batch), index].transpose(1, 2).reshape(batch, dim, height, width)
    dense = encoder.dense_fc_2(encoder.relu(encoder.dense_fc_1(prompted)))
    tokens = activated.reshape(batch * encoder.num_classes, height * width, dim)
    tokens = encoder.sparse_fc_2(encoder.relu(encoder.sparse_fc_1(tokens)))
    tokens = tokens.reshape(batch, encoder.num_classes, encoder.num_tokens, dim)
    is_prompted = nn.functional.one_hot(index, encoder.num_classes).to(tokens.dtype)[..., None, None]
    tokens = (
        tokens
        + is_prompted * encoder.pn_cls_embeddings[1].weight
        + (1 - is_prompted) * encoder.pn_cls_embeddings[0].weight
    )
    return dense, tokens.reshape(batch, -1, dim)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("grid,num_classes,batch", [((3, 5), 3, 4), ((7, 7), 1, 1), ((4, 6), 7, 1), ((5, 3), 2, 3)])
def test_prompt_encoder_without_the_activated_tensor_equals_the_plain_one(grid, num_classes, batch):
    """Fast path (ScaledPositionMix, dense prompt from the prompted class only) = plain path, forward
    and gradients of every input and parameter, on odd grids, C = 1 and batch 1."""
    torch.manual_seed(3)
    dim = 16
    encoder = PrototypePromptEncoder(num_classes, 2, grid, embed_dim=dim, dense_hidden_dim=6, sparse_hidden_dim=5)
    with torch.no_grad():
        for embedding in encoder.pn_cls_embeddings:
            embedding.weight.normal_()
    image = (0.5 * torch.randn(batch, dim, *grid, dtype=torch.float64)).requires_grad_()
    prototypes = (0.5 * torch.randn(num_classes, dim, dtype=torch.float64)).requires_grad_()
    class_ids = torch.randint(1, num_classes + 1, (batch,))
    encoder = encoder.double()
    weights = (
        torch.randn(batch, dim, *grid, dtype=torch.float64),
        torch.randn(batch, num_classes * 2, dim, dtype=torch.float64),
    )
    results = []
    for forward in (encoder, lambda *args: plain_prompt_encoder(encoder, *args)):
        encoder.zero_grad()
        image.grad = prototypes.grad = None
        dense, sparse = forward(image, prototypes, class_ids)
        ((dense * weights[0]).sum() + (sparse * weights[1]).sum()).backward()
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.requires_grad}
        results.append((dense.detach(), sparse.detach(), image.grad.clone(), prototypes.grad.clone(), grads))
    fast, plain = results
    assert relative_error(fast[0], plain[0]) <= 1e-5 and relative_error(fast[1], plain[1]) <= 1e-5
    assert relative_error(fast[2], plain[2]) <= 1e-4 and relative_error(fast[3], plain[3]) <= 1e-4
    assert set(fast[4]) == set(plain[4]) and len(fast[4]) == 8
    for name in plain[4]:
        assert relative_error(fast[4][name], plain[4][name]) <= 1e-4, name
    # and in float32, the dtype training runs in
    encoder = encoder.float()
    with torch.no_grad():
        fast32 = encoder(image.float(), prototypes.float(), class_ids)
        plain32 = plain_prompt_encoder(encoder, image.float(), prototypes.float(), class_ids)
    assert relative_error(fast32[0], plain32[0]) <= 1e-5 and relative_error(fast32[1], plain32[1]) <= 1e-5


def test_frame_prompts_then_pair_prompts_equal_forward():
    """The automatic protocol's shared per-frame prompts give forward's prompts for any (frame, class) pair."""
    torch.manual_seed(5)
    encoder = PrototypePromptEncoder(3, 2, (3, 5), embed_dim=8, dense_hidden_dim=4, sparse_hidden_dim=6)
    image, prototypes = torch.randn(2, 8, 3, 5), torch.randn(3, 8)
    frames, classes = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 2, 0, 1, 2])
    with torch.no_grad():
        scale, tokens = encoder.frame_prompts(image, prototypes)
        dense, sparse = encoder.pair_prompts(image[frames], scale[frames], tokens[frames], classes)
        expected = plain_prompt_encoder(encoder, image[frames], prototypes, classes + 1)
    assert relative_error(dense, expected[0]) <= 1e-5 and relative_error(sparse, expected[1]) <= 1e-5


@pytest.mark.skipif(not hasattr(torch, "autocast"), reason="needs torch.autocast")
def test_prompt_encoder_under_bf16_autocast_is_close_to_float32():
    torch.manual_seed(6)
    encoder = PrototypePromptEncoder(3, 2, (4, 4), embed_dim=16, dense_hidden_dim=8, sparse_hidden_dim=8)
    image, prototypes, class_ids = (
        torch.randn(2, 16, 4, 4, requires_grad=True),
        torch.randn(3, 16),
        torch.tensor([1, 3]),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, sparse = encoder(image, prototypes, class_ids)
    (dense.float().sum() + sparse.float().sum()).backward()
    expected = plain_prompt_encoder(encoder, image.detach(), prototypes, class_ids)
    assert image.grad.dtype == torch.float32 and encoder.sparse_fc_1.weight.grad.dtype == torch.float32
    assert relative_error(sparse.float(), expected[1]) < 0.05 and relative_error(dense.float(), expected[0]) < 0.05


def test_prompt_encoder_rejects_other_grid():
    encoder = PrototypePromptEncoder(2, 1, (2, 3), embed_dim=4)
    with pytest.raises(ValueError, match="grid_size"):
        encoder(torch.randn(1, 4, 3, 2), torch.randn(2, 4), torch.tensor([1]))


def test_pn_embeddings_initialised_from_sam_points():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    points = sam.prompt_encoder.point_embeddings
    assert not torch.equal(points[0].weight, points[1].weight)
    encoder = PrototypePromptEncoder(4, 3, (GRID, GRID))
    encoder.init_from_sam_points(points)
    assert torch.equal(encoder.pn_cls_embeddings[1].weight, points[1].weight.expand(3, -1))  # positive
    assert torch.equal(encoder.pn_cls_embeddings[0].weight, points[0].weight.expand(3, -1))  # negative
    assert not any(p.requires_grad for p in encoder.pn_cls_embeddings.parameters())
    # and the model does it with its own SAM prompt encoder
    model = tiny_model(num_tokens=4)
    model_points = model.prompt_encoder.point_embeddings
    assert torch.equal(model.class_prompt_encoder.pn_cls_embeddings[1].weight, model_points[1].weight.expand(4, -1))
    assert torch.equal(model.class_prompt_encoder.pn_cls_embeddings[0].weight, model_points[0].weight.expand(4, -1))


def test_prototype_bank():
    torch.manual_seed(0)
    bank = PrototypeBank(5, 16)
    assert bank().shape == (5, 16)
    assert bank() is bank.class_embeddings.weight
    assert list(bank.state_dict()) == ["class_embeddings.weight"]


# -------------------------------------------------------------------------------- batched decoding
@pytest.mark.parametrize("multimask_output", [False, True])
def test_batched_decoding_equals_per_sample_calls(multimask_output):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    decoder = sam.mask_decoder
    image_pe = sam.prompt_encoder.get_dense_pe()
    image = embeddings(3, seed=2)
    sparse = torch.randn(3, 5, 256)
    dense = 0.5 * torch.randn(3, 256, GRID, GRID)

    captured = []
    hook = decoder.transformer.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    with torch.no_grad():
        expected = [
            decoder(
                image_embeddings=image[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=multimask_output,
            )
            for i in range(3)
        ]
        hook.remove()
        masks, iou, mask_tokens = decode_masks(
            decoder, image, image_pe, sparse, dense, multimask_output, return_mask_tokens=True
        )
    num_masks = 3 if multimask_output else 1
    assert masks.shape == (3, num_masks, LOW_RES, LOW_RES)
    assert iou.shape == (3, num_masks)
    assert mask_tokens.shape == (3, decoder.num_mask_tokens, 256)
    for i, (expected_masks, expected_iou) in enumerate(expected):
        assert close(masks[i : i + 1], expected_masks), i
        assert close(iou[i : i + 1], expected_iou), i
        assert close(mask_tokens[i], captured[i][0, 1 : 1 + decoder.num_mask_tokens]), i
    # the samples really differ (a decoder that mixed them up could not pass)
    assert not close(masks[0], masks[1])


def test_forward_batched_equals_per_sample_and_original_loop():
    model = tiny_model()
    image = embeddings(3)
    class_ids = torch.tensor([1, 3, 2])
    with torch.no_grad():
        out = model(image, class_ids)
        assert out["logits"].shape == (3, 1, *FRAME_SIZE)
        assert out["low_res_logits"].shape == (3, 1, LOW_RES, LOW_RES)
        assert out["quality"].shape == (3,)
        assert out["image_embeddings"].shape == (3, 256, GRID, GRID)
        assert torch.equal(out["prototypes"], model.prototypes.class_embeddings.weight)
        image_pe = model.prompt_encoder.get_dense_pe()
        for i in range(3):
            single = model(image[i : i + 1], class_ids[i : i + 1])
            for key in ("logits", "low_res_logits", "quality"):
                assert close(out[key][i : i + 1], single[key]), (i, key)
            # the original: prompt encoder, then SAM's decoder on one sample with multimask_output=False
            dense, sparse = model.class_prompt_encoder(image[i : i + 1], model.prototypes(), class_ids[i : i + 1])
            low_res, iou = model.mask_decoder(
                image_embeddings=image[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            assert close(out["low_res_logits"][i : i + 1], low_res)
            assert close(out["quality"][i : i + 1], iou[:, 0])
            assert close(out["logits"][i : i + 1], low_res_logits_to_frame(low_res, IMAGE_SIZE, FRAME_SIZE))
    # another class on the same image gives another mask
    with torch.no_grad():
        other = model(image, torch.tensor([2, 1, 3]))
    assert not close(other["low_res_logits"], out["low_res_logits"])


# ---------------------------------------------------------------------------------- predict_classes
def test_predict_classes_equals_forward_per_pair():
    model = tiny_model()
    image = embeddings(2)
    class_mask = torch.tensor([[True, False, True], [False, True, True]])
    with torch.no_grad():
        logits, quality = model.predict_classes(image, class_mask)
        assert logits.shape == (2, NUM_CLASSES, *FRAME_SIZE)
        assert quality.shape == (2, NUM_CLASSES)
        for b in range(2):
            for k in range(NUM_CLASSES):
                if class_mask[b, k]:
                    single = model(image[b : b + 1], torch.tensor([k + 1]))
                    assert close(logits[b, k], single["logits"][0, 0]), (b, k)
                    assert close(quality[b, k], single["quality"][0]), (b, k)
                else:
                    assert torch.isneginf(logits[b, k]).all(), (b, k)
                    assert torch.isneginf(quality[b, k]), (b, k)
        assert torch.isfinite(logits[class_mask]).all()
        one_at_a_time, quality_one = model.predict_classes(image, class_mask, pairs_per_pass=1)
    assert torch.equal(torch.isneginf(one_at_a_time), torch.isneginf(logits))
    assert close(one_at_a_time[class_mask], logits[class_mask])
    assert close(quality_one[class_mask], quality[class_mask])


def test_predict_classes_nothing_prompted():
    model = tiny_model()
    with torch.no_grad():
        logits, quality = model.predict_classes(embeddings(1), torch.zeros(1, NUM_CLASSES, dtype=torch.bool))
    assert logits.shape == (1, NUM_CLASSES, *FRAME_SIZE)
    assert torch.isneginf(logits).all() and torch.isneginf(quality).all()


# ---------------------------------------------------------------------------------------- raw frames
def test_forward_on_frames_equals_forward_on_embeddings():
    model = tiny_model(with_image_encoder=True)
    generator = torch.Generator().manual_seed(3)
    frames = 255.0 * torch.rand(2, 3, 60, 80, generator=generator)  # not the model's frame_size
    class_ids = torch.tensor([2, 1])
    with torch.no_grad():
        from_frames = model(frames, class_ids)
        cached = model.embed_frames(frames)
        from_embeddings = model(cached, class_ids)
    assert cached.shape == (2, 256, GRID, GRID)
    assert torch.equal(from_frames["image_embeddings"], cached)
    assert close(from_frames["low_res_logits"], from_embeddings["low_res_logits"])
    assert close(from_frames["quality"], from_embeddings["quality"])
    # logits at the frame's own size from frames, at the configured frame_size from embeddings
    assert from_frames["logits"].shape == (2, 1, 60, 80)
    assert from_embeddings["logits"].shape == (2, 1, *FRAME_SIZE)
    expected_logits = low_res_logits_to_frame(from_embeddings["low_res_logits"], IMAGE_SIZE, (60, 80))
    assert close(from_frames["logits"], expected_logits)
    # predict_classes takes frames too
    with torch.no_grad():
        logits, _ = model.predict_classes(frames, torch.tensor([[False, True, False], [True, False, False]]))
    assert logits.shape == (2, NUM_CLASSES, 60, 80)
    assert close(logits[0, 1], from_frames["logits"][0, 0]) and close(logits[1, 0], from_frames["logits"][1, 0])


def test_frames_need_the_image_encoder():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="with_image_encoder"):
        model(torch.zeros(1, 3, 60, 80), torch.tensor([1]))


# -------------------------------------------------------------------------------------- state dict
def test_state_dict_has_no_image_encoder_and_round_trips():
    source = tiny_model(seed=0, with_image_encoder=True)
    state = source.state_dict()
    assert not any(k.startswith("image_encoder.") for k in state)
    assert "prototypes.class_embeddings.weight" in state
    assert "class_prompt_encoder.pn_cls_embeddings.0.weight" in state
    assert "class_prompt_encoder.sparse_fc_1.weight" in state
    assert any(k.startswith("mask_decoder.") for k in state)
    assert any(k.startswith("prompt_encoder.") for k in state)

    for with_image_encoder in (False, True):
        target = tiny_model(seed=1, with_image_encoder=with_image_encoder)
        assert not torch.equal(target.prototypes().detach(), source.prototypes().detach())
        target.load_state_dict(state)
        loaded = target.state_dict()
        assert set(loaded) == set(state)
        for key in state:
            assert torch.equal(loaded[key], state[key]), key
        image = embeddings(2)
        with torch.no_grad():
            assert close(target(image, torch.tensor([1, 2]))["logits"], source(image, torch.tensor([1, 2]))["logits"])


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("change", ["module_prefix", "missing_key", "extra_key"])
def test_load_state_dict_rejects_other_keys_even_when_not_strict(change, strict):
    state = tiny_model(seed=0).state_dict()
    if change == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif change == "missing_key":
        del state["class_prompt_encoder.sparse_fc_2.bias"]
    else:
        state["class_prompt_encoder.extra.weight"] = torch.zeros(2)
    target = tiny_model(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not fit"):
        target.load_state_dict(state, strict=strict)
    after = target.state_dict()
    for key in before:  # a failed load leaves the network as it was
        assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize(("source", "target"), [({"num_classes": 7}, {}), ({"num_tokens": 4}, {})])
def test_load_state_dict_for_other_configuration_raises(source, target):
    state = tiny_model(seed=0, **source).state_dict()
    model = tiny_model(seed=1, **target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="another shape"):
        model.load_state_dict(state, strict=False)
    after = model.state_dict()
    for key in before:  # nothing loaded, not even the keys of matching shape
        assert torch.equal(after[key], before[key]), key


def test_sam_checkpoint_is_loaded(tiny_sam_checkpoint):
    sam_state = torch.load(tiny_sam_checkpoint, weights_only=True)
    torch.manual_seed(5)
    model = SurgicalSAM(
        NUM_CLASSES, 2, FRAME_SIZE, sam_variant="tiny", sam_checkpoint=tiny_sam_checkpoint, with_image_encoder=True
    )
    for part in ("mask_decoder", "prompt_encoder", "image_encoder"):
        for key, value in getattr(model, part).state_dict().items():
            assert torch.equal(value, sam_state[f"{part}.{key}"]), f"{part}.{key}"
    positive = model.class_prompt_encoder.pn_cls_embeddings[1].weight
    assert torch.equal(positive[0], sam_state["prompt_encoder.point_embeddings.1.weight"][0])


# -------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("class_ids", [[0], [NUM_CLASSES + 1], [1, -1]])
def test_class_ids_outside_range(class_ids):
    model = tiny_model()
    with pytest.raises(ValueError, match=f"1..{NUM_CLASSES}"):
        model(embeddings(len(class_ids)), torch.tensor(class_ids))


def test_embeddings_on_wrong_grid():
    model = tiny_model()
    with pytest.raises(ValueError, match="grid_size"):
        model(embeddings(1, grid=(GRID // 2, GRID // 2)), torch.tensor([1]))
    with pytest.raises(ValueError, match="grid_size"):
        model.predict_classes(embeddings(1, grid=(GRID, GRID // 2)), torch.ones(1, NUM_CLASSES, dtype=torch.bool))
    with pytest.raises(ValueError):
        model(torch.randn(1, 128, GRID, GRID), torch.tensor([1]))  # neither frames nor embeddings


# --------------------------------------------------------------------------------------- gradients
def test_gradients_reach_trainable_parts_only():
    model = tiny_model(with_image_encoder=True).train()
    frames = 255.0 * torch.rand(2, 3, 60, 80, generator=torch.Generator().manual_seed(4))
    out = model(frames, torch.tensor([1, 3]))
    out["logits"].square().mean().backward()

    def grads(module):
        return {name: p.grad for name, p in module.named_parameters()}

    prototype_grad = model.prototypes.class_embeddings.weight.grad
    assert prototype_grad is not None and prototype_grad.abs().sum() > 0
    encoder_grads = {k: g for k, g in grads(model.class_prompt_encoder).items() if "pn_cls_embeddings" not in k}
    assert set(encoder_grads) == {
        f"{layer}.{kind}"
        for layer in ("dense_fc_1", "dense_fc_2", "sparse_fc_1", "sparse_fc_2")
        for kind in ("weight", "bias")
    }
    for name, grad in encoder_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    decoder_grads = grads(model.mask_decoder)
    for name in (
        "mask_tokens.weight",
        "output_upscaling.0.weight",
        "transformer.final_attn_token_to_image.q_proj.weight",
        "output_hypernetworks_mlps.0.layers.0.weight",
    ):
        assert decoder_grads[name] is not None and decoder_grads[name].abs().sum() > 0, name
    for part in (model.prompt_encoder, model.image_encoder, model.class_prompt_encoder.pn_cls_embeddings):
        assert all(p.grad is None for p in part.parameters())


def test_prompt_encoder_takes_monai_metatensors():
    """MONAI's transforms hand MetaTensors to the network (inference.yaml): the same prompts as plain tensors."""
    from monai.data import MetaTensor

    torch.manual_seed(8)
    encoder = PrototypePromptEncoder(3, 2, (3, 5), embed_dim=8, dense_hidden_dim=4, sparse_hidden_dim=6)
    image, prototypes, class_ids = torch.randn(2, 8, 3, 5), torch.randn(3, 8), torch.tensor([2, 3])
    with torch.no_grad():
        plain = encoder(image, prototypes, class_ids)
        meta = encoder(MetaTensor(image), prototypes, class_ids)
    assert torch.equal(torch.as_tensor(meta[0]), plain[0]) and torch.equal(torch.as_tensor(meta[1]), plain[1])


@pytest.mark.parametrize("tokens", [1, 3])
def test_hypernetwork_masks_on_channels_last_features_equal_the_plain_product(tokens):
    """The product on channels-last features (as the decoder's transposed convolutions return them on the
    CPU) and SAM's ``hyper_in @ upscaled.view(B, c, H*W)``: forward <= 1e-5, gradients <= 1e-4 relative,
    and the features' gradient comes back channels-last (one layout in the GELU backward)."""
    from scripts.sam.batched_mask_decoder import hypernetwork_masks

    generator = torch.Generator().manual_seed(0)
    hyper_in = torch.randn(2, tokens, 8, generator=generator, requires_grad=True)
    plain_features = torch.randn(2, 8, 7, 9, generator=generator)
    features = plain_features.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(2, tokens, 7, 9, generator=generator)
    fast = hypernetwork_masks(hyper_in, features)
    plain = (hyper_in @ plain_features.reshape(2, 8, 63)).reshape(2, tokens, 7, 9)
    assert fast.shape == (2, tokens, 7, 9)
    assert float((fast - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    grad_hyper, grad_features = torch.autograd.grad((fast * weight).sum(), (hyper_in, features))
    plain_leaf = plain_features.clone().requires_grad_()
    hyper_leaf = hyper_in.detach().clone().requires_grad_()
    expected = torch.autograd.grad(
        ((hyper_leaf @ plain_leaf.reshape(2, 8, 63)).reshape(2, tokens, 7, 9) * weight).sum(), (hyper_leaf, plain_leaf)
    )
    for got, want in zip((grad_hyper, grad_features), expected):
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert grad_features.is_contiguous(memory_format=torch.channels_last)


def test_decode_masks_keeps_a_zero_gradient_on_the_unused_hypernetworks():
    """Only the returned masks are made, yet every hypernetwork MLP gets a gradient (zero for the unused
    tokens), as when all masks are made and sliced: Adam's weight decay then moves them the same way."""
    model = tiny_model()
    out = model(embeddings(2), torch.tensor([1, 2]))
    out["logits"].sum().backward()
    mlps = model.mask_decoder.output_hypernetworks_mlps
    assert all(p.grad is not None for p in mlps.parameters())
    assert any(float(p.grad.abs().max()) > 0 for p in mlps[0].parameters())
    assert all(float(p.grad.abs().max()) == 0 for mlp in mlps[1:] for p in mlp.parameters())


@pytest.mark.parametrize(
    ("kernel", "bias", "channels_last"), [((2, 2), True, True), ((2, 2), False, False), ((3, 2), True, True)]
)
def test_transposed_conv_as_product_equals_the_convolution(kernel, bias, channels_last):
    """kernel == stride transposed convolution as one product: the module's output (<= 1e-5) and the
    gradients of input, weight and bias (<= 1e-4 relative), odd sizes, batch 1."""
    from scripts.sam.batched_mask_decoder import transposed_conv_as_product

    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 4, kernel_size=kernel, stride=kernel, bias=bias)
    features = torch.randn(1, 6, 5, 7)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_()
    weight = torch.randn(1, 4, 5 * kernel[0], 7 * kernel[1])
    plain = conv(features)
    fast = transposed_conv_as_product(conv, features)
    assert fast.shape == plain.shape and fast.is_contiguous(memory_format=torch.channels_last)
    assert float((fast - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    inputs = (features, *conv.parameters())
    expected = torch.autograd.grad((plain * weight).sum(), inputs)
    got = torch.autograd.grad((fast * weight).sum(), inputs)
    for want, have in zip(expected, got):
        assert float((have - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_upscale_equals_sams_output_upscaling():
    from scripts.sam.batched_mask_decoder import upscale

    model = tiny_model()
    upscaling = model.mask_decoder.output_upscaling
    features = torch.randn(2, 5 * 3, 256).transpose(1, 2).reshape(2, 256, 5, 3)  # the transformer's layout
    assert torch.allclose(upscale(upscaling, features), upscaling(features), atol=1e-5)
