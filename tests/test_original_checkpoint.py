"""Conversion of original SurgicalSAM checkpoints into the bundle's models/model.pt.

The original checkpoint is built in the test from a SurgicalSAM with random weights, renamed into the
three dicts as the original code names them. The converted model must give the same logits, and so must
an independent re-implementation of the original's per-sample forward written from the paper.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.cli import convert_original_checkpoint
from scripts.sam.backbone import build_sam
from scripts.surgical_sam.network import SurgicalSAM

NUM_CLASSES, NUM_TOKENS, FRAME = 3, 2, (64, 80)  # tiny SAM: 256 input, 16x16 grid, d = 256
IMAGE_SIZE = 256


def random_model(sam_checkpoint: str, seed: int, num_classes: int = NUM_CLASSES, num_tokens: int = NUM_TOKENS):
    torch.manual_seed(seed)
    model = SurgicalSAM(num_classes, num_tokens, FRAME, "tiny", sam_checkpoint).eval()
    with torch.no_grad():  # move every trainable part (and the frozen pos/neg embeddings) off the SAM weights
        for name, parameter in model.named_parameters():
            if not name.startswith(("prompt_encoder.", "image_encoder.")):
                parameter.add_(0.05 * torch.randn_like(parameter))
        for embedding in model.class_prompt_encoder.pn_cls_embeddings:
            embedding.weight.add_(torch.randn_like(embedding.weight))
    return model


def to_original(model: SurgicalSAM) -> dict:
    """The three dicts of the original code's checkpoint."""
    state = model.state_dict()

    def part(prefix):
        return {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}

    return {
        "prototype_prompt_encoder_state_dict": part("class_prompt_encoder."),
        "sam_decoder_state_dict": part("mask_decoder."),
        "prototypes_state_dict": part("prototypes."),
    }


@pytest.fixture
def original_file(tmp_path, small_sam_checkpoint):
    model = random_model(small_sam_checkpoint, seed=1)
    path = str(tmp_path / "surgicalsam_ckpt.pth")
    torch.save(to_original(model), path)
    return path, model


def original_forward(original: dict, sam_checkpoint: str, features: torch.Tensor, class_id: int):
    """The original's forward for ONE sample, from the paper; features (1, d, h, w) -> logits (1, 1, H, W).

    Prompt encoder from the equations with the raw tensors; SAM's own MaskDecoder and PromptEncoder.
    """
    encoder, prototypes = original["prototype_prompt_encoder_state_dict"], original["prototypes_state_dict"]
    sam = build_sam("tiny", sam_checkpoint)
    sam.mask_decoder.load_state_dict(original["sam_decoder_state_dict"])
    _, d, h, w = features.shape
    feat = features[0].reshape(d, h * w).T  # F: (h*w, d)
    protos = prototypes["class_embeddings.weight"]  # P: (C, d)
    num_classes = protos.shape[0]
    dense = sparse = None
    sparse_tokens = []
    for k in range(num_classes):
        s_k = feat @ protos[k]  # (h*w,)
        f_k = feat + feat * s_k[:, None]  # (h*w, d)
        if k == class_id - 1:  # dense prompt: 1x1 convs = per-position linear maps over d
            hidden = torch.relu(f_k @ encoder["dense_fc_1.weight"][:, :, 0, 0].T + encoder["dense_fc_1.bias"])
            out = hidden @ encoder["dense_fc_2.weight"][:, :, 0, 0].T + encoder["dense_fc_2.bias"]  # (h*w, d)
            dense = out.T.reshape(1, d, h, w)
        # sparse: MLP over the spatial axis, positions as channels: (h*w, d) -> (128, d) -> (n, d)
        hidden = torch.relu(encoder["sparse_fc_1.weight"][:, :, 0] @ f_k + encoder["sparse_fc_1.bias"][:, None])
        tokens = encoder["sparse_fc_2.weight"][:, :, 0] @ hidden + encoder["sparse_fc_2.bias"][:, None]  # (n, d)
        tokens = tokens + encoder["pn_cls_embeddings.1.weight" if k == class_id - 1 else "pn_cls_embeddings.0.weight"]
        sparse_tokens.append(tokens)
    sparse = torch.cat(sparse_tokens)[None]  # (1, C*n, d)
    low_res, _ = sam.mask_decoder(
        image_embeddings=features,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    # SAM's postprocess: up to the padded input, crop the resized frame, down to the frame size
    scale = IMAGE_SIZE / max(FRAME)
    valid = (int(FRAME[0] * scale + 0.5), int(FRAME[1] * scale + 0.5))
    logits = F.interpolate(low_res, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    logits = logits[..., : valid[0], : valid[1]]
    return F.interpolate(logits, size=FRAME, mode="bilinear", align_corners=False)


@torch.no_grad()
def test_converted_checkpoint_gives_the_same_logits(tmp_path, original_file, small_sam_checkpoint, capsys):
    src, trained = original_file
    dst = str(tmp_path / "models" / "model.pt")
    info = convert_original_checkpoint(src, dst, sam_checkpoint=small_sam_checkpoint)
    assert info["num_classes"] == NUM_CLASSES and info["num_tokens"] == NUM_TOKENS
    assert info["grid_positions"] == 16 * 16 and info["embed_dim"] == 256
    assert "num_classes 3" in capsys.readouterr().out
    checkpoint = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"}
    fresh = random_model(small_sam_checkpoint, seed=2)
    features = torch.randn(4, 256, 16, 16, generator=torch.Generator().manual_seed(0))
    class_ids = torch.tensor([1, 2, 3, 2])
    before = fresh(features, class_ids)["logits"]
    fresh.load_state_dict(checkpoint["model"])
    converted = fresh(features, class_ids)["logits"]
    expected = trained(features, class_ids)["logits"]
    assert (before - expected).abs().max() > 1e-2  # the fresh model really differed before loading
    assert (converted - expected).abs().max() <= 1e-4
    original = torch.load(src, map_location="cpu", weights_only=True)
    for b in range(4):
        reference = original_forward(original, small_sam_checkpoint, features[b : b + 1], int(class_ids[b]))
        assert (converted[b : b + 1] - reference).abs().max() <= 1e-4, b


def test_checked_counts(tmp_path, original_file, small_sam_checkpoint):
    src, _ = original_file
    dst = str(tmp_path / "model.pt")
    with pytest.raises(SystemExit, match="trained for 3 classes.*--num_classes 3"):
        convert_original_checkpoint(src, dst, small_sam_checkpoint, num_classes=7)
    with pytest.raises(SystemExit, match="2 tokens per class.*--num_tokens 2"):
        convert_original_checkpoint(src, dst, small_sam_checkpoint, num_tokens=4)
    convert_original_checkpoint(src, dst, small_sam_checkpoint, num_classes=3, num_tokens=2)


@pytest.mark.parametrize(
    "damage",
    [
        "no_prototypes",
        "sam_file",
        "bundle_file",
        "extra_key",
        "missing_key",
        "encoder_shape",
        "decoder_shape",
        "prototype_shape",
    ],
)
def test_wrong_files_are_named(tmp_path, original_file, small_sam_checkpoint, damage):
    src, _ = original_file
    original = torch.load(src, map_location="cpu", weights_only=True)
    expected = {
        "no_prototypes": "lacks \\['prototypes_state_dict'\\]",
        "sam_file": "SAM weights",
        "bundle_file": "bundle model.pt already",
        "extra_key": "1 unexpected keys \\(e.g. \\['extra.weight'\\]\\)",
        "missing_key": "1 missing keys \\(e.g. \\['dense_fc_1.bias'\\]\\)",
        "encoder_shape": "prompt_encoder_state_dict has tensors of unexpected shape: 1 keys of another shape \\(e.g. "
        "dense_fc_2.bias: \\(3,\\) in the file, \\(256,\\) in the original encoder\\)",
        "decoder_shape": "of another shape",
        "prototype_shape": "must be \\(C, d\\)",
    }[damage]
    if damage == "no_prototypes":
        del original["prototypes_state_dict"]
    elif damage == "sam_file":
        original = torch.load(small_sam_checkpoint, map_location="cpu", weights_only=True)
    elif damage == "bundle_file":
        original = {"model": {"prototypes.class_embeddings.weight": torch.zeros(3, 256)}}
    elif damage == "extra_key":
        original["prototype_prompt_encoder_state_dict"]["extra.weight"] = torch.zeros(1)
    elif damage == "missing_key":
        encoder = original["prototype_prompt_encoder_state_dict"]
        del encoder[next(k for k in encoder if k.endswith("dense_fc_1.bias"))]
    elif damage == "encoder_shape":
        encoder = original["prototype_prompt_encoder_state_dict"]
        encoder[next(k for k in encoder if k.endswith("dense_fc_2.bias"))] = torch.zeros(3)
    elif damage == "decoder_shape":
        original["sam_decoder_state_dict"]["iou_token.weight"] = torch.zeros(2, 256)
    else:
        original["prototypes_state_dict"]["class_embeddings.weight"] = torch.zeros(3, 256, 1)
    bad = str(tmp_path / "bad.pth")
    torch.save(original, bad)
    with pytest.raises(SystemExit, match=expected):
        convert_original_checkpoint(bad, str(tmp_path / "model.pt"), small_sam_checkpoint)
    assert not (tmp_path / "model.pt").exists()


def test_missing_files(tmp_path, original_file):
    src, _ = original_file
    with pytest.raises(SystemExit, match="SAM checkpoint not found.*--sam_checkpoint"):
        convert_original_checkpoint(src, str(tmp_path / "m.pt"), sam_checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(SystemExit, match="original SurgicalSAM checkpoint not found"):
        convert_original_checkpoint(str(tmp_path / "none.pth"), str(tmp_path / "m.pt"), str(tmp_path / "x"))


def test_convert_from_the_command_line(tmp_path, original_file, small_sam_checkpoint):
    from scripts.cli import main

    src, trained = original_file
    dst = tmp_path / "model.pt"
    main(
        [
            "convert_original_checkpoint",
            "--src",
            src,
            "--dst",
            str(dst),
            "--sam_checkpoint",
            small_sam_checkpoint,
            "--num_classes",
            "3",
            "--num_tokens",
            "2",
        ]
    )
    state = torch.load(dst, map_location="cpu", weights_only=True)["model"]
    torch.testing.assert_close(state["prototypes.class_embeddings.weight"], trained.prototypes.class_embeddings.weight)
