"""MONAI transforms for inference on a folder of frames: reading frames, writing label maps.

``LoadFramed`` reads with the same reader as training (grey and RGBA frames become RGB), optionally
crops (``frame_crop``: the preparation's crop; ``UncropLabeld`` puts the label map back at the frame's
size) and keeps the file name in the tensor's metadata; ``FrameDataset`` marks an unreadable frame
instead of stopping the run; ``LabelMaskd`` makes the 2D uint8 mask that ends
postprocessing (MONAI Label writes it as a 2D PNG; in MONAI's (x, y) order, see there); ``SaveLabelMapd`` writes, per frame, the PNG label map
(values 0..C), a colour overlay and, on request, a NIfTI file (nibabel).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from .frame_files import read_frame
from .layout import DatasetError
from .overlay import overlay
from .video_io import VIDEO_EXTENSIONS

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_frames(folder: str, extensions: Sequence[str] = FRAME_EXTENSIONS) -> list[dict]:
    """Every frame under ``folder`` (recursive, sorted) as ``[{"image": path}, ...]``."""
    if os.path.isfile(folder) and folder.lower().endswith(VIDEO_EXTENSIONS):
        raise DatasetError(
            f"{folder} is a video file, and inference.yaml segments a folder of frames: segment the video with the "
            "video overlay, inference.yaml's `run` with configs/inference_video.yaml merged right after inference.yaml "
            f"(`python -m monai.bundle run --config_file \"['configs/inference.yaml','configs/inference_video.yaml']\" "
            f"--dataset_dir {folder}`: label maps, per-frame JSON and an overlay video), or pass --dataset_dir "
            "FOLDER_OF_FRAMES"
        )
    if os.path.isfile(folder):
        raise DatasetError(
            f"{folder} is a file, not a folder of frames: pass --dataset_dir FOLDER_OF_FRAMES (or a "
            f"video, {', '.join(VIDEO_EXTENSIONS)}, with the overlay inference_video.yaml)"
        )
    if not os.path.isdir(folder):
        raise DatasetError(f"frame folder {folder} does not exist: pass --dataset_dir FOLDER_OF_FRAMES")
    frames = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(tuple(extensions)) and not name.endswith(("_overlay.png", "_seg.png"))
    )
    if not frames:
        raise DatasetError(f"no frames ({', '.join(extensions)}) in {folder}: put the frames to segment there")
    return [{"image": path} for path in frames]


#: What to do about an unreadable frame of a folder of frames (there is no dataset.json to fix).
FRAME_FOLDER_ADVICE = "replace it with an 8-bit RGB or grey PNG/JPEG, or move it out of the frame folder"


def frame_crop_box(crop) -> tuple[int, int, int, int] | None:
    """``[[row0, row1], [col0, col1]]`` (the preparation's crop, e.g. prepare_endovis2017's) -> (row0, row1, col0,
    col1); None for no crop. ValueError naming the setting when it is malformed."""
    if crop is None:
        return None
    try:
        (row0, row1), (col0, col1) = ((int(a), int(b)) for a, b in crop)
    except (TypeError, ValueError):
        raise ValueError(
            f"frame_crop must be [[row0, row1], [col0, col1]] (e.g. [[28, 1052], [320, 1600]]) or null, got {crop!r}"
        ) from None
    if not (0 <= row0 < row1 and 0 <= col0 < col1):
        raise ValueError(f"frame_crop {crop!r}: need 0 <= row0 < row1 and 0 <= col0 < col1")
    return row0, row1, col0, col1


class LoadFramed(MapTransform):
    """Path -> frame (3, H, W) float32 on the 0..255 scale, a MetaTensor with ``filename_or_obj``.

    Args:
        keys: the frame path key.
        crop: ``[[row0, row1], [col0, col1]]``: segment only that window of every frame (the black borders of
            raw EndoVis2017 frames stay out, as in the preparation); the frame is then (3, row1 - row0,
            col1 - col0) and its metadata keeps ``original_spatial_shape`` [H, W] for :class:`UncropLabeld`.
            None: the whole frame.
    """

    def __init__(self, keys, crop=None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.crop = frame_crop_box(crop)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        result = dict(data)
        for key in self.key_iterator(result):
            path = str(result[key])
            array = read_frame(path, advice=FRAME_FOLDER_ADVICE)
            original = list(array.shape[:2])
            if self.crop is not None:
                row0, row1, col0, col1 = self.crop
                if array.shape[0] < row1 or array.shape[1] < col1:
                    raise DatasetError(
                        f"frame {path} is {array.shape[0]}x{array.shape[1]}, smaller than frame_crop rows "
                        f"{row0}:{row1}, columns {col0}:{col1}: set frame_crop to fit these frames, or null for "
                        "whole frames"
                    )
                array = array[row0:row1, col0:col1]
            frame = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
            result[key] = MetaTensor(
                frame,
                meta={
                    "filename_or_obj": path,
                    "spatial_shape": list(frame.shape[1:]),
                    "original_spatial_shape": original,
                },
            )
        return result


class UncropLabeld(MapTransform):
    """Predicted label map (..., h, w) of a cropped frame -> (..., H, W) of the whole frame, 0 (background)
    outside the crop; nothing to do without a crop. Runs before :class:`LabelMaskd` in postprocessing.

    Args:
        keys: the prediction key.
        crop: the same ``[[row0, row1], [col0, col1]]`` as :class:`LoadFramed`'s.
        image_key: the frame, whose ``original_spatial_shape`` metadata gives (H, W).
    """

    def __init__(self, keys, crop=None, image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.crop, self.image_key = frame_crop_box(crop), image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        result = dict(data)
        if self.crop is None:
            return result
        row0, row1, col0, col1 = self.crop
        image = result.get(self.image_key)
        shape = getattr(image, "meta", {}).get("original_spatial_shape")
        if shape is None:
            raise ValueError(
                f"{self.image_key} has no original_spatial_shape metadata: load frames with LoadFramed(crop=...)"
            )
        height, width = (int(v) for v in shape)
        for key in self.key_iterator(result):
            value = torch.as_tensor(result[key])
            if tuple(value.shape[-2:]) != (row1 - row0, col1 - col0):
                raise ValueError(f"{key} is {tuple(value.shape[-2:])}, not the crop's {(row1 - row0, col1 - col0)}")
            full = torch.zeros((*value.shape[:-2], height, width), dtype=value.dtype, device=value.device)
            full[..., row0:row1, col0:col1] = value
            result[key] = full
        return result


class FrameDataset(Dataset):
    """MONAI ``Dataset`` of a folder of frames that does not stop at an unreadable one.

    Each item gets ``unreadable``: "" for a frame that loaded, else "<file>: <why>" and ``image`` an empty
    (3, 0, 0) tensor; ``scripts.engine.handlers.UnreadableFrames`` skips those items, reports them by name at the end
    and fails the run, after every other frame is written.
    """

    def _transform(self, index: int):
        try:
            item = dict(super()._transform(index))
        except Exception as error:  # MONAI wraps a transform's error in "applying transform ..." RuntimeErrors
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, DatasetError):
                cause = cause.__cause__
            if cause is None:
                raise
            path = self.data[index].get("image") if isinstance(self.data[index], Mapping) else self.data[index]
            return {"image": torch.zeros(3, 0, 0), "unreadable": str(cause), "image_path": str(path)}
        item["unreadable"] = ""
        return item


class LabelMaskd(MapTransform):
    """Predicted label map (..., H, W) -> one 2D uint8 mask, the form MONAI Label writes as a 2D PNG.

    The last transform of ``postprocessing`` in inference.yaml: MONAI Label's BundleInferTask writes what
    postprocessing leaves under ``pred``. Leading singleton axes (batch, channel) are dropped; a map holding
    more than one frame, or values outside 0..255, is an error rather than a silent cast.

    Args:
        keys: the prediction key.
        xy_order: return the mask as (W, H), MONAI's (x, y) axis order for 2D images. MONAI Label 0.8.5's
            writer transposes the array before writing (it expects MONAI's order, as its image loaders give),
            so a (H, W) mask would come back as a transposed PNG. The frame's ``spatial_shape`` metadata
            (``image_key``) is stated in the same order, so MONAI Label's ``Restored`` sees no size change.
        image_key: the frame, whose metadata is updated with ``xy_order``.
    """

    def __init__(
        self, keys, xy_order: bool = False, image_key: str = "image", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.xy_order, self.image_key = xy_order, image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        result = dict(data)
        for key in self.key_iterator(result):
            value = torch.as_tensor(result[key]).detach()
            if value.ndim < 2 or any(int(s) != 1 for s in value.shape[:-2]):
                raise ValueError(
                    f"{key}: expected one label map (..., H, W) with singleton leading axes, "
                    f"got shape {tuple(value.shape)}"
                )
            value = value.reshape(value.shape[-2:])
            if value.numel() and (int(value.min()) < 0 or int(value.max()) > 255):
                raise ValueError(
                    f"{key}: label values must be in 0..255 for a uint8 mask, got "
                    f"{int(value.min())}..{int(value.max())}"
                )
            value = value.to(torch.uint8).cpu()
            if self.xy_order:
                height, width = value.shape
                value = value.t().contiguous()
                image = result.get(self.image_key)
                if hasattr(image, "meta"):
                    image.meta["spatial_shape"] = [width, height]
            result[key] = value
        return result


class SaveLabelMapd(MapTransform):
    """Write each predicted label map (1, H, W) as ``<stem>_seg.png`` (+ overlay, + NIfTI).

    Args:
        keys: the prediction key (``pred``).
        output_dir: folder to write into; frames keep their path relative to ``input_dir``.
        input_dir: the frame folder (to mirror its sub-folders); None writes flat.
        image_key: where the frame and its file name are.
        write_overlay: also write ``<stem>_overlay.png``, the frame tinted by class.
        write_nifti: also write ``<stem>_seg.nii.gz`` (uint8, (H, W) as the first two axes, identity affine).
        xy_order: the prediction comes as (W, H) (``LabelMaskd(xy_order=True)``); it is transposed back.
    """

    def __init__(
        self,
        keys,
        output_dir: str,
        input_dir: str | None = None,
        image_key: str = "image",
        write_overlay: bool = True,
        write_nifti: bool = False,
        xy_order: bool = False,
    ) -> None:
        super().__init__(keys)
        self.output_dir, self.input_dir, self.image_key = output_dir, input_dir, image_key
        self.write_overlay, self.write_nifti, self.xy_order = write_overlay, write_nifti, xy_order

    def _stem(self, image) -> str:
        source = str(getattr(image, "meta", {}).get("filename_or_obj", "frame"))
        if self.input_dir and os.path.abspath(source).startswith(os.path.abspath(self.input_dir) + os.sep):
            source = os.path.relpath(source, self.input_dir)
        else:
            source = os.path.basename(source)
        return os.path.join(self.output_dir, os.path.splitext(source)[0])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        result = dict(data)
        image = result.get(self.image_key)
        stem = self._stem(image)
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        for key in self.key_iterator(result):
            label_map = torch.as_tensor(result[key]).detach().cpu().numpy().reshape(result[key].shape[-2:])
            if self.xy_order:
                label_map = label_map.T
            label_map = label_map.astype(np.uint8)
            Image.fromarray(label_map).save(f"{stem}_seg.png")
            if self.write_overlay and image is not None:
                frame = torch.as_tensor(image).detach().cpu().permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8)
                if frame.shape[:2] != label_map.shape:  # a cropped frame (frame_crop): the overlay shows the whole one
                    frame = read_frame(str(image.meta["filename_or_obj"]), advice=FRAME_FOLDER_ADVICE)
                Image.fromarray(overlay(frame, label_map)).save(f"{stem}_overlay.png")
            if self.write_nifti:
                import nibabel as nib

                nib.save(nib.Nifti1Image(label_map, np.eye(4)), f"{stem}_seg.nii.gz")
        return result
