"""Tests of scripts.sam.backbone and scripts.sam.geometry (segment-anything's geometry)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.sam.backbone import (
    SAM_DOWNLOAD_URL,
    SAM_VARIANTS,
    build_sam,
    get_variant,
    guess_variant,
    import_sam_modeling,
    load_sam_checkpoint,
    save_random_sam_checkpoint,
)
from scripts.sam.checkpoint import file_md5, memoised_md5
from scripts.sam.geometry import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    bilinear_source_lines,
    frames_to_sam_input,
    low_res_logits_to_frame,
    masks_to_embedding_grid,
    masks_to_mask_input,
    pil_bilinear_resize_lines,
    resized_shape,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VIT_B_MD5 = "01ec64d29a2fca3f0661936605ae66f8"
VIT_B_NAME = "sam_vit_b_01ec64.pth"


def tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    return build_sam("tiny")


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ builders
def test_build_tiny_is_segment_anything_sam():
    modeling = import_sam_modeling()
    spec = get_variant("tiny")
    grid = spec.grid_size
    assert grid == spec.image_size // spec.patch_size
    sam = tiny_sam()
    assert isinstance(sam, modeling.Sam)
    assert isinstance(sam.image_encoder, modeling.ImageEncoderViT)
    assert isinstance(sam.prompt_encoder, modeling.PromptEncoder)
    assert isinstance(sam.mask_decoder, modeling.MaskDecoder)
    assert not sam.training
    assert sam.image_encoder.img_size == spec.image_size
    with torch.no_grad():
        out = sam.image_encoder(torch.randn(2, 3, spec.image_size, spec.image_size))
    assert out.shape == (2, 256, grid, grid)
    assert sam.prompt_encoder.get_dense_pe().shape == (1, 256, grid, grid)
    with torch.no_grad():
        masks, iou = sam.mask_decoder(
            out[:1],
            sam.prompt_encoder.get_dense_pe(),
            torch.randn(1, 2, 256),
            torch.randn(1, 256, grid, grid),
            multimask_output=False,
        )
    assert masks.shape == (1, 1, 4 * grid, 4 * grid) and iou.shape == (1, 1)


def test_official_variants_have_64x64_grid_and_published_md5():
    for name in ("vit_h", "vit_l", "vit_b"):
        spec = get_variant(name)
        assert spec.image_size == 1024 and spec.grid_size == 64 and spec.prompt_embed_dim == 256
    assert get_variant("vit_b").checkpoint_name == VIT_B_NAME
    assert get_variant("vit_b").md5 == VIT_B_MD5
    assert get_variant("vit_h").checkpoint_name == "sam_vit_h_4b8939.pth"
    assert get_variant("vit_l").checkpoint_name == "sam_vit_l_0b3195.pth"


def test_get_variant_unknown_name_lists_variants():
    with pytest.raises(ValueError) as info:
        get_variant("vit_x")
    message = str(info.value)
    assert "vit_x" in message
    for name in SAM_VARIANTS:
        assert name in message


def test_import_sam_modeling_works_without_torchvision():
    """In a fresh interpreter: the plain package import needs torchvision, ours does not."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: the no-torchvision path cannot be exercised")
    code = (
        "import importlib, sys\n"
        "try:\n"
        "    import segment_anything\n"
        "except ModuleNotFoundError as error:\n"
        "    assert error.name.startswith('torchvision'), error.name\n"
        "else:\n"
        "    raise AssertionError('segment_anything imported although torchvision is missing')\n"
        "from scripts.sam.backbone import import_sam_modeling, build_sam\n"
        "modeling = import_sam_modeling()\n"
        "assert 'torchvision' not in sys.modules\n"
        "assert isinstance(build_sam('tiny'), modeling.Sam)\n"
        "assert import_sam_modeling() is modeling\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "bundle"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -------------------------------------------------------------------------------- checkpoint loading
def test_missing_checkpoint_names_path_and_download(tmp_path):
    path = str(tmp_path / "weights" / VIT_B_NAME)
    with pytest.raises(FileNotFoundError) as info:
        load_sam_checkpoint(tiny_sam(), path, variant="vit_b")
    message = str(info.value)
    assert path in message
    assert VIT_B_NAME in message
    assert f"{SAM_DOWNLOAD_URL}{VIT_B_NAME}" in message
    assert SAM_DOWNLOAD_URL == "https://dl.fbaipublicfiles.com/segment_anything/"


def test_missing_tiny_checkpoint_says_how_to_make_one(tmp_path):
    path = str(tmp_path / "sam_tiny.pth")
    with pytest.raises(FileNotFoundError) as info:
        build_sam("tiny", checkpoint=path)
    message = str(info.value)
    assert path in message
    assert "no official weights" in message


def test_corrupt_checkpoint_could_not_be_read(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="could not be read") as info:
        load_sam_checkpoint(tiny_sam(), str(path), variant="tiny")
    assert str(path) in str(info.value)


def test_official_name_with_wrong_content_fails_md5(tmp_path, tiny_sam_checkpoint):
    # A perfectly loadable file under the official name: only the md5 check can reject it.
    path = tmp_path / VIT_B_NAME
    path.write_bytes(Path(tiny_sam_checkpoint).read_bytes())
    sam = tiny_sam(seed=1)
    with pytest.raises(ValueError, match="md5") as info:
        load_sam_checkpoint(sam, str(path), variant="vit_b")
    message = str(info.value)
    assert VIT_B_MD5 in message
    assert str(path) in message
    # With the md5 check off, the same file goes through to the key checks and loads
    # (the model is tiny), which shows it was the md5 that rejected it above.
    load_sam_checkpoint(sam, str(path), variant="vit_b", check_md5=False)
    assert_same_state(sam.state_dict(), torch.load(tiny_sam_checkpoint, weights_only=True))


def test_md5_checked_before_unpickling(tmp_path):
    path = tmp_path / VIT_B_NAME
    path.write_bytes(os.urandom(1024))
    with pytest.raises(ValueError, match=VIT_B_MD5):
        load_sam_checkpoint(tiny_sam(), str(path), variant="vit_b")
    with pytest.raises(ValueError, match="could not be read"):
        load_sam_checkpoint(tiny_sam(), str(path), variant="vit_b", check_md5=False)


def test_checkpoint_md5_is_hashed_once_and_again_when_the_file_changes(tmp_path, tiny_sam_checkpoint):
    path = tmp_path / VIT_B_NAME
    path.write_bytes(Path(tiny_sam_checkpoint).read_bytes())
    real = file_md5(str(path))
    assert memoised_md5(str(path)) == real
    memo = Path(f"{path}.md5")
    key, stored = memo.read_text().split()
    assert stored == real
    # The md5 check of a build reads the memo, not the file: a memo that claims the official md5 for this
    # size and mtime lets the (tiny) file through to the key checks, where it loads into the tiny model.
    memo.write_text(f"{key} {VIT_B_MD5}\n")
    sam = tiny_sam(seed=1)
    load_sam_checkpoint(sam, str(path), variant="vit_b")
    assert_same_state(sam.state_dict(), torch.load(tiny_sam_checkpoint, weights_only=True))
    # Another mtime: the memo no longer applies, the file is hashed again and the check refuses it.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=VIT_B_MD5):
        load_sam_checkpoint(tiny_sam(), str(path), variant="vit_b")
    assert memo.read_text().split()[1] == real


def test_tiny_checkpoint_into_vit_b_does_not_match(tiny_sam_checkpoint):
    with pytest.raises(ValueError, match="does not match") as info:
        build_sam("vit_b", checkpoint=tiny_sam_checkpoint)
    message = str(info.value)
    assert "'vit_b'" in message
    assert "sam_variant to 'tiny'" in message  # the guessed variant of the file
    assert tiny_sam_checkpoint in message


def test_guess_variant():
    state = tiny_sam().state_dict()
    assert guess_variant(state) == "tiny"
    assert guess_variant({k: v for k, v in state.items() if not k.startswith("image_encoder.")}) is None


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_checkpoint_with_other_keys_or_shapes_fails(tmp_path, tiny_sam_checkpoint, change):
    state = torch.load(tiny_sam_checkpoint, weights_only=True)
    if change == "extra":
        state["mask_decoder.extra_head.weight"] = torch.zeros(3)
        expected = "unexpected"
    elif change == "missing":
        del state["mask_decoder.iou_token.weight"]
        expected = "missing"
    else:
        state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
        expected = "another shape"
    path = tmp_path / "changed.pth"
    torch.save(state, path)
    sam = tiny_sam(seed=1)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    with pytest.raises(ValueError, match="does not match") as info:
        load_sam_checkpoint(sam, str(path), variant="tiny")
    assert expected in str(info.value)
    assert_same_state(sam.state_dict(), before)  # nothing loaded


def test_checkpoint_wrapped_in_model_key_loads(tmp_path, tiny_sam_checkpoint):
    state = torch.load(tiny_sam_checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state}, path)
    sam = build_sam("tiny", checkpoint=str(path))
    assert_same_state(sam.state_dict(), state)


def test_random_checkpoint_round_trip(tmp_path, tiny_sam_checkpoint):
    saved = torch.load(tiny_sam_checkpoint, weights_only=True)
    torch.manual_seed(123)  # a different random init, overwritten by the load
    sam = build_sam("tiny", checkpoint=tiny_sam_checkpoint)
    assert not sam.training
    assert_same_state(sam.state_dict(), saved)
    # seeded: the same seed gives the same file contents, another seed other weights
    again = torch.load(save_random_sam_checkpoint(str(tmp_path / "a" / "again.pth"), seed=0), weights_only=True)
    assert_same_state(again, saved)
    other = torch.load(save_random_sam_checkpoint(str(tmp_path / "other.pth"), seed=1), weights_only=True)
    assert not torch.equal(other["mask_decoder.iou_token.weight"], saved["mask_decoder.iou_token.weight"])
    assert not os.path.exists(str(tmp_path / "other.pth") + ".tmp")


# ------------------------------------------------------------------------------------------ geometry
def test_resized_shape():
    assert resized_shape((1024, 1280), 1024) == (819, 1024)
    assert resized_shape((1080, 1920), 1024) == (576, 1024)
    assert resized_shape((1280, 1024), 1024) == (1024, 819)
    assert resized_shape((100, 120), 256) == (213, 256)
    assert resized_shape((256, 256), 256) == (256, 256)
    assert resized_shape((2, 4), 5) == (3, 5)  # 2.5 rounds up, as segment-anything does


def test_frames_to_sam_input_shape_normalisation_and_zero_padding():
    frames = torch.full((2, 3, 100, 120), 255.0)
    out = frames_to_sam_input(frames, 256)
    assert out.shape == (2, 3, 256, 256)
    assert out.dtype == torch.float32
    expected = (255.0 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    valid = out[:, :, :213, :]
    assert torch.allclose(valid, expected.view(1, 3, 1, 1).expand_as(valid), atol=1e-4)
    assert torch.count_nonzero(out[:, :, 213:, :]) == 0
    # uint8 input and a frame that already has the longest side: as SAM's preprocess (normalise, pad)
    sam = tiny_sam()
    size = sam.image_encoder.img_size
    frames = torch.randint(0, 256, (1, 3, size - 10, size), dtype=torch.uint8)
    out = frames_to_sam_input(frames, size)
    assert torch.allclose(out, sam.preprocess(frames.float()), atol=1e-5)
    assert torch.count_nonzero(out[:, :, size - 10 :, :]) == 0
    with pytest.raises(ValueError):
        frames_to_sam_input(torch.zeros(1, 1, 100, 120), 256)


@pytest.mark.parametrize("frame_hw, image_size", [((1024, 1280), 1024), ((480, 640), 1024), ((128, 160), 256)])
def test_frames_to_sam_input_is_within_one_grey_level_of_pils_resize(frame_hw, image_size):
    """The original feeds SAM segment-anything's ``ResizeLongestSide`` output: PIL's antialiased bilinear
    resize of the uint8 frame, rounded after each pass. The bundle resizes in float and never rounds, so its
    SAM input is at most about 1 grey level (0..255 scale) from the original's (bundle/docs/fidelity.md)."""
    from PIL import Image

    frame = np.random.default_rng(0).integers(0, 256, (*frame_hw, 3), dtype=np.uint8)
    new_h, new_w = resized_shape(frame_hw, image_size)
    pil = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR), np.float64).transpose(2, 0, 1)
    sam_input = frames_to_sam_input(torch.from_numpy(frame).permute(2, 0, 1)[None], image_size)[0].double()
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float64).view(3, 1, 1)
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float64).view(3, 1, 1)
    grey = (sam_input[:, :new_h, :new_w] * std + mean).numpy()
    difference = np.abs(grey - pil)
    assert difference.max() <= 1.01, difference.max()
    assert 0.1 < difference.mean() < 0.4, difference.mean()  # not the same computation: rounding differs


def test_masks_to_embedding_grid_left_half():
    mask = torch.zeros(1, 1024, 1280, dtype=torch.uint8)
    mask[:, :, :640] = 1
    grid = masks_to_embedding_grid(mask, 1024, (64, 64))
    assert grid.shape == (1, 64, 64) and grid.dtype == torch.bool
    # A cell (i, j) samples the padded 1024x1024 mask at (16 i + 7.5, 16 j + 7.5): on where that lies
    # in the resized frame's left half (columns < 512) and above the padding (rows < 819).
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:51, :32] = True
    assert torch.equal(grid[0], expected)
    # an empty mask stays empty, a full one is on exactly over the valid rows
    assert not masks_to_embedding_grid(torch.zeros(1, 1024, 1280), 1024, (64, 64)).any()
    full = masks_to_embedding_grid(torch.ones(1, 1024, 1280), 1024, (64, 64))[0]
    assert full[:51].all() and not full[51:].any()
    with pytest.raises(ValueError):
        masks_to_embedding_grid(torch.zeros(1, 1, 64, 64), 1024, (64, 64))


def test_masks_to_embedding_grid_threshold_is_half_the_centre_sample():
    # No resize or padding (the mask is already 1024x1024): cell (i, j) is the mean of the 2x2
    # pixels at rows/cols 16 i + 7 and 16 i + 8; on above 0.485.
    mask = torch.zeros(1, 1024, 1024)
    mask[0, :, 7] = 1  # half of the centre sample of every cell in grid column 0
    mask[0, 23, 23] = 1  # a quarter of the centre sample of cell (1, 1)
    grid = masks_to_embedding_grid(mask, 1024, (64, 64))[0]
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(grid, expected)


def test_masks_to_embedding_grid_fragmented_mask_by_hand():
    # A 40x64 frame at image_size 64 is not resized; rows 40..63 are padding. Grid 4x4: cell (i, j)
    # averages the normalised values at rows 16i+7, 16i+8 and cols 16j+7, 16j+8; a mask pixel gives
    # (255 - 123.675) / 58.395 = +2.249, a background pixel -2.118, a padded one 0.
    mask = torch.zeros(1, 40, 64, dtype=torch.uint8)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    mask[0, :16, :16] = (rows + cols) % 2  # checkerboard: 2 of the 4 samples of cell (0, 0) -> on
    mask[0, 7, 23] = 1  # 1 of 4 samples of cell (0, 1) -> off
    mask[0, 23, 7] = mask[0, 24, 7] = mask[0, 23, 8] = 1  # 3 of 4 of cell (1, 0) -> on
    mask[0, 30:, 40:] = 1  # a block whose cell (1, 2) samples (rows 23, 24) miss it -> off
    # cells (2, j) sample row 39 (the last frame row) and row 40 (padding): padding weighs 0, so one
    # mask pixel of the two valid samples is enough (2.249 - 2.118 > 0); a rule that counts padding as
    # background would need two of the four
    mask[0, 39, 7] = 1  # cell (2, 0): 1 of 2 valid samples -> on
    # cell (2, 1): (39, 23) and (39, 24) are background: 0 of 2 -> off
    # cell (2, 2): the block covers (39, 40) but not (39, 39): 1 of 2 -> on
    # cell (2, 3): the block covers (39, 55) and (39, 56): 2 of 2 -> on
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 0, 0, 0],
            [1, 0, 1, 1],
            [0, 0, 0, 0],  # rows 55, 56: all padding
        ],
        dtype=torch.bool,
    )
    assert torch.equal(masks_to_embedding_grid(mask, 64, (4, 4))[0], expected)


def test_masks_to_embedding_grid_is_the_originals_preprocessing():
    # The original's route, written out: the mask as channel 0 of an RGB uint8 0/255 image, PIL's
    # bilinear resize of the longest side (segment-anything's ResizeLongestSide), SAM's normalisation,
    # zero padding, bilinear to 64x64, > 0. On fragmented masks of a 1024x1280 frame.
    from PIL import Image

    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(3, 1024, 1280, dtype=torch.bool)
    for index in range(3):
        for _ in range(60):
            top, left = (
                torch.randint(0, 1000, (1,), generator=generator),
                torch.randint(0, 1260, (1,), generator=generator),
            )
            size = torch.randint(2, 40, (2,), generator=generator)
            masks[index, top : top + size[0], left : left + size[1]] = True
        masks[index] ^= torch.rand(1024, 1280, generator=generator) < 0.02 * index  # speckle
    expected = []
    for mask in masks:
        rgb = np.zeros((1024, 1280, 3), dtype=np.uint8)
        rgb[..., 0] = mask.numpy().astype(np.uint8) * 255
        resized = np.asarray(Image.fromarray(rgb).resize((1024, 819), Image.BILINEAR))
        values = (
            torch.from_numpy(resized).permute(2, 0, 1).float() - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
        ) / torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
        values = torch.nn.functional.pad(values, (0, 0, 0, 1024 - 819))[None]
        expected.append(torch.nn.functional.interpolate(values, size=(64, 64), mode="bilinear")[0, 0] > 0)
    grid = masks_to_embedding_grid(masks, 1024, (64, 64))
    assert torch.equal(grid, torch.stack(expected))
    # the non-antialiased, >= 0.5 rule of bundle 0.3 differs on such masks (the model card's figure)
    older = masks_to_mask_input(masks, 1024, (64, 64))
    assert (older != grid).any()


def test_low_res_logits_to_frame_shape_and_constant():
    low_res = torch.full((2, 3, 128, 128), 2.5)
    out = low_res_logits_to_frame(low_res, 256, (100, 120))
    assert out.shape == (2, 3, 100, 120)
    assert torch.allclose(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize(("image_size", "frame_hw"), [(256, (100, 120)), (256, (128, 256)), (1024, (1024, 1280))])
def test_low_res_logits_to_frame_equals_sam_postprocess(image_size, frame_hw):
    modeling = import_sam_modeling()
    low_res = torch.randn(2, 1, image_size // 4, image_size // 4)
    fake_sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=image_size))
    expected = modeling.Sam.postprocess_masks(fake_sam, low_res, resized_shape(frame_hw, image_size), frame_hw)
    out = low_res_logits_to_frame(low_res, image_size, frame_hw)
    assert out.shape == (2, 1, *frame_hw)
    assert torch.allclose(out, expected, atol=1e-6)


def test_low_res_logits_to_frame_crops_the_padding():
    # 128x256 frame on a 256 input: valid rows 0..127 of 256, i.e. low-res rows 0..63 of 128.
    low_res = torch.where(torch.arange(128) < 64, 1.0, -1.0).expand(1, 1, 128, 128).clone()
    low_res[..., 64:, :] = 1e6  # padding: must not reach the frame (but for bilinear's last row)
    out = low_res_logits_to_frame(low_res, 256, (128, 256))
    assert out.shape == (1, 1, 128, 256)
    body = out[0, 0, :127]
    assert (body[:, :128] > 0).all() and (body[:, 128:] < 0).all()
    assert body.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("low_hw", "image_size", "frame_hw", "channels"),
    [
        ((24, 24), 96, (50, 73), 1),
        ((24, 24), 96, (73, 50), 3),
        ((32, 32), 128, (64, 128), 1),
        ((16, 16), 64, (64, 64), 2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_by_products_equals_the_interpolation(low_hw, image_size, frame_hw, channels, dtype):
    """The training path's two matrix products and SAM's two bilinear resizes: the same map (odd and
    equal frame sizes, portrait and landscape, batch 1), forward <= 1e-5 and gradients <= 1e-4 relative."""
    from scripts.sam.geometry import resize_by_interpolation, resize_by_products

    generator = torch.Generator().manual_seed(0)
    low_res = (torch.randn(1, channels, *low_hw, generator=generator) * 4).to(dtype).requires_grad_()
    weight = torch.randn(1, channels, *frame_hw, generator=generator).to(dtype)
    plain = resize_by_interpolation(low_res, image_size, frame_hw)
    fast = resize_by_products(low_res, image_size, frame_hw)
    assert fast.shape == plain.shape == (1, channels, *frame_hw) and fast.dtype == dtype
    assert float((fast - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    (grad_plain,) = torch.autograd.grad((plain * weight).sum(), low_res)
    (grad_fast,) = torch.autograd.grad((fast * weight).sum(), low_res)
    assert float((grad_fast - grad_plain).abs().max()) <= 1e-4 * float(grad_plain.abs().max())
    # the dispatch: products when a gradient is wanted, the interpolation otherwise
    assert torch.equal(low_res_logits_to_frame(low_res, image_size, frame_hw), fast)
    with torch.no_grad():
        assert torch.equal(low_res_logits_to_frame(low_res, image_size, frame_hw), plain.detach())


def test_resize_by_products_keeps_float32_under_autocast():
    from scripts.sam.geometry import resize_by_interpolation, resize_by_products

    low_res = torch.randn(2, 1, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = resize_by_products(low_res, 64, (48, 64))
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, resize_by_interpolation(low_res, 64, (48, 64)), atol=1e-5)
    # the decoder's low-res logits come as bf16 under autocast: the frame-size logits stay float32 (not
    # rounded to bf16), the resize of those bf16 values computed in float32, and the gradient flows back
    half = low_res.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = resize_by_products(half, 64, (48, 64))
    assert fast.dtype == torch.float32
    expected = resize_by_interpolation(half.detach().float(), 64, (48, 64))
    assert torch.allclose(fast, expected, atol=1e-5)
    assert not torch.equal(fast, fast.to(torch.bfloat16).float())
    fast.sum().backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "size_hw, resized_hw",
    [
        ((1024, 1280), (819, 1024)),
        ((128, 160), (205, 256)),
        ((37, 53), (100, 143)),
        ((50, 80), (50, 120)),
        ((90, 60), (45, 60)),
        ((7, 9), (3, 4)),
        ((1080, 1920), (576, 1024)),
    ],
)
def test_pil_bilinear_resize_lines_equals_pils_resize(size_hw, resized_hw):
    # down, up, odd, one side unchanged (PIL skips that pass), tiny; every line and a random subset of lines
    from PIL import Image

    generator = np.random.default_rng(5)
    images = {
        "random": generator.integers(0, 256, (2, *size_hw), dtype=np.uint8),
        "binary": generator.random((2, *size_hw)) < 0.3,
    }
    for kind, image in images.items():
        as_uint8 = image.astype(np.uint8) * 255 if kind == "binary" else image
        expected = np.stack(
            [np.asarray(Image.fromarray(one).resize(resized_hw[::-1], Image.BILINEAR)) for one in as_uint8]
        )
        every = pil_bilinear_resize_lines(image, resized_hw, np.arange(resized_hw[0]), np.arange(resized_hw[1]))
        assert every.dtype == np.uint8 and np.array_equal(every, expected), kind
        rows = np.sort(generator.choice(resized_hw[0], max(1, resized_hw[0] // 3), replace=False))
        cols = np.sort(generator.choice(resized_hw[1], max(1, resized_hw[1] // 3), replace=False))
        assert np.array_equal(
            pil_bilinear_resize_lines(image, resized_hw, rows, cols), expected[:, rows][:, :, cols]
        ), kind


def test_bilinear_source_lines_only_at_whole_even_strides():
    assert bilinear_source_lines(1024, 64).tolist()[:4] == [7, 8, 23, 24]
    assert bilinear_source_lines(8, 4).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # stride 2: every line
    assert bilinear_source_lines(60, 4) is None  # stride 15
    assert bilinear_source_lines(64, 5) is None  # not a whole stride
    assert bilinear_source_lines(64, 64) is None  # stride 1


@pytest.mark.parametrize(
    "frame_hw, image_size, grid",
    [
        ((1024, 1280), 1024, 64),
        ((1280, 1024), 1024, 64),
        ((128, 160), 256, 16),
        ((37, 53), 64, 4),
        ((64, 64), 64, 8),
        ((30, 50), 60, 4),
        ((50, 30), 64, 5),
    ],
)
def test_masks_to_embedding_grid_on_the_read_lines_equals_the_whole_image(frame_hw, image_size, grid):
    # the plain computation written out: PIL's resize of the whole 0/255 mask, normalise, pad, bilinear to
    # the grid, > 0 (strides 16, 16, 16, 8 read lines alone; 15 and 12.8 take the whole image)
    from PIL import Image

    generator = torch.Generator().manual_seed(11)
    masks = torch.rand(4, *frame_hw, generator=generator) < torch.tensor([0.02, 0.3, 0.5, 0.97]).view(4, 1, 1)
    masks[0, : frame_hw[0] // 2, : frame_hw[1] // 3] = True  # a block beside speckle
    new_h, new_w = resized_shape(frame_hw, image_size)
    expected = []
    for mask in masks:
        image = mask.numpy().astype(np.uint8) * 255
        if (new_h, new_w) != tuple(frame_hw):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        values = (torch.from_numpy(image.astype(np.float32)) - 123.675) / 58.395
        values = torch.nn.functional.pad(values, (0, image_size - new_w, 0, image_size - new_h))
        expected.append(
            torch.nn.functional.interpolate(values[None, None], size=(grid, grid), mode="bilinear")[0, 0] > 0
        )
    expected = torch.stack(expected)
    assert torch.equal(masks_to_embedding_grid(masks, image_size, (grid, grid)), expected)
    assert torch.equal(masks_to_embedding_grid(masks.float(), image_size, (grid, grid)), expected)  # float masks too
    assert masks_to_embedding_grid(masks[:0], image_size, (grid, grid)).shape == (0, grid, grid)


@pytest.mark.parametrize("content", [b"\x80\x02random bytes that are no checkpoint" * 40, b"hello world\n" * 50])
def test_a_random_file_as_sam_checkpoint_gets_the_bundles_advice(tmp_path, content):
    from scripts.sam.backbone import build_sam
    from scripts.sam.prompting import load_sam_mask_decoder

    path = tmp_path / "not_sam.pth"
    path.write_bytes(content)
    for load in (lambda: build_sam("tiny", str(path)), lambda: load_sam_mask_decoder("tiny", str(path))):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert str(path) in message and "not a PyTorch weights file" in message
        assert "weights_only" not in message and "will likely succeed" not in message
        assert "--sam_checkpoint" in message
