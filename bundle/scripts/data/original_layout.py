"""Train and evaluate on the original SurgicalSAM code's processed data, without re-encoding.

The original's preparation writes, per dataset::

    endovis_2018/train/<version>/{images,annotations,binary_annotations,sam_features_h}/seqN/...
    endovis_2018/val/{images,annotations,binary_annotations,sam_features_h}/seqN/...
    endovis_2017/<version>/{images,annotations,binary_annotations,sam_features_h}/seqN/...

with ``sam_features_h/seqN/<frame>.npy`` float32 (h, w, d) = (64, 64, 256) SAM ViT-H embeddings of the
version's augmented frame and ``binary_annotations/seqN/<frame>_class<c>.png`` one 0/255 mask per class
present. Versions 0..40 (0 = not augmented, as the original code stores them). EndoVis2018: train on ``train/`` (the 11
training sequences), validate on ``val/`` (sequences 2, 5, 9, 15). EndoVis2017: every version folder
holds all eight sequences and a fold chooses them: fold0 validates on [1, 3], fold1 [2, 5], fold2 [4, 8],
fold3 [6, 7] and trains on the other six; validation reads version 0 of its sequences. (Version folders
under ``endovis_2017/train/<version>`` are accepted as well.)

:class:`OriginalLayoutReader` offers the interface of ``embedding_cache.EmbeddingCache``, so
``CachedPromptDataset`` and ``CachedFrameDataset`` read this layout unchanged. Splits: ``training`` /
``validation`` (for EndoVis2017 those of the chosen fold) and, for EndoVis2017, ``fold<k>_training`` /
``fold<k>_validation`` for k = 0..3.

A training sample (frame, class c) uses class c's own binary mask, as the original does
(:meth:`OriginalLayoutReader.load_class_mask`), so masks that overlap (PIL's rounding of the scaled
masks of an augmented version can leave a boundary pixel on in two) stay as they are. Validation
needs one label map per frame: 0 background, c where the mask of class c is on; a pixel on in two or
more class masks is ambiguous there (the masks carry no quality to decide by) and becomes
``ignore_index`` (255), counted by no metric; each such frame is logged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..sam.backbone import get_variant
from ..sam.geometry import masks_to_embedding_grid
from .known_datasets import ENDOVIS2017_FOLDS as ENDOVIS_2017_FOLD_SEQUENCES
from .layout import DEFAULT_IGNORE_INDEX, DatasetError, name_files

logger = logging.getLogger(__name__)

ENDOVIS_2018, ENDOVIS_2017 = "endovis_2018", "endovis_2017"
LAYOUTS = (ENDOVIS_2018, ENDOVIS_2017)
#: EndoVis2017 cross-validation folds: validation sequences of each fold (by dataset number, as the original code).
ENDOVIS_2017_FOLDS = dict(enumerate(ENDOVIS_2017_FOLD_SEQUENCES))
ENDOVIS_2017_SEQUENCES = tuple(range(1, 9))
MASKS_DIR = "binary_annotations"
IMAGES_DIR = "images"
_MASK_NAME = re.compile(r"^(?P<frame>.+)_class(?P<class_id>\d+)\.png$")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class OriginalLayoutError(DatasetError):
    """The original layout on disk is missing something or holds a file the bundle cannot use."""


class OriginalLayoutReader:
    """The original's processed data, read as an embedding cache (see the module docstring).

    Args:
        root: the dataset folder, ``<data_root>/endovis_2018`` or ``<data_root>/endovis_2017``.
        layout: ``endovis_2018`` or ``endovis_2017`` (default: the folder's name).
        class_names: the C names of label values 1..C (the config's ``class_names``).
        sam_variant: the SAM the features were made with (``vit_h`` for ``sam_features_h``): gives the input
            size S, the grid (h, w) and d the features are checked against.
        fold: EndoVis2017 fold 0..3 that ``training`` / ``validation`` mean.
        augmentation_versions: K, training reads versions 0..K (each must exist).
        features_dir: the features folder name (``sam_features_h``).
        ignore_index: label value of ambiguous (overlapping) pixels.
    """

    def __init__(
        self,
        root: str,
        class_names: Sequence[str],
        sam_variant: str = "vit_h",
        layout: str | None = None,
        fold: int = 0,
        augmentation_versions: int = 40,
        features_dir: str = "sam_features_h",
        ignore_index: int = DEFAULT_IGNORE_INDEX,
    ) -> None:
        self.cache_dir = self.root = os.path.abspath(str(root))
        if not os.path.isdir(self.root):
            raise OriginalLayoutError(
                f"no folder {self.root}: point data_root at the folder holding endovis_2018/ or endovis_2017/ as the "
                "original SurgicalSAM preparation writes them (see scripts/data/original_layout.py)"
            )
        self.layout = layout or os.path.basename(self.root.rstrip(os.sep))
        if self.layout not in LAYOUTS:
            raise OriginalLayoutError(
                f"layout must be one of {LAYOUTS} (the original's folder names), got {self.layout!r}"
            )
        if self.layout == ENDOVIS_2017 and int(fold) not in ENDOVIS_2017_FOLDS:
            raise OriginalLayoutError(f"fold must be one of {sorted(ENDOVIS_2017_FOLDS)}, got {fold!r}")
        spec = get_variant(sam_variant)
        self._class_names = [str(n) for n in class_names]
        self.image_size = spec.image_size
        self.grid_size = (spec.grid_size, spec.grid_size)
        self.embed_dim = spec.prompt_embed_dim
        self.fold, self.features_dir, self.ignore_index = int(fold), features_dir, int(ignore_index)
        self.augmentation_versions = int(augmentation_versions)
        self._splits = self._split_table()
        self._indexes: dict[tuple[str, int], list[dict]] = {}

    # ------------------------------------------------------------------------------------------ layout
    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def _version_dir(self, version: int) -> str:
        if self.layout == ENDOVIS_2018:
            return os.path.join(self.root, "train", str(version))
        for candidate in (os.path.join(self.root, str(version)), os.path.join(self.root, "train", str(version))):
            if os.path.isdir(candidate):
                return candidate
        return os.path.join(self.root, str(version))

    def _split_table(self) -> dict[str, dict]:
        """split -> {"versions": [...], "folder": version -> folder, "sequences": names or None (all)}."""
        training_versions = list(range(self.augmentation_versions + 1))
        if self.layout == ENDOVIS_2018:
            return {
                "training": {"versions": training_versions, "folder": self._version_dir, "sequences": None},
                "validation": {"versions": [0], "folder": lambda v: os.path.join(self.root, "val"), "sequences": None},
            }
        table = {}
        for fold, held_out in ENDOVIS_2017_FOLDS.items():
            train = [f"seq{k}" for k in ENDOVIS_2017_SEQUENCES if k not in held_out]
            table[f"fold{fold}_training"] = {
                "versions": training_versions,
                "folder": self._version_dir,
                "sequences": train,
            }
            table[f"fold{fold}_validation"] = {
                "versions": [0],
                "folder": self._version_dir,
                "sequences": [f"seq{k}" for k in held_out],
            }
        table["training"] = table[f"fold{self.fold}_training"]
        table["validation"] = table[f"fold{self.fold}_validation"]
        return table

    def versions(self, split: str) -> list[int]:
        if split not in self._splits:
            raise OriginalLayoutError(
                f"the original {self.layout} layout has no split {split!r}: choose one of "
                f"{sorted(self._splits)} (train_split / val_split in the config)"
            )
        return list(self._splits[split]["versions"])

    def check(self, splits: Sequence[str]) -> None:
        """Fail at once when a folder the splits need is missing (every one named)."""
        missing = []
        for split in splits:
            self.versions(split)  # unknown split: its own error
            info = self._splits[split]
            for version in info["versions"]:
                folder = info["folder"](version)
                for sub in (self.features_dir, MASKS_DIR):
                    for sequence in info["sequences"] or [None]:
                        path = os.path.join(folder, sub, sequence) if sequence else os.path.join(folder, sub)
                        if not os.path.isdir(path):
                            missing.append(path)
        if missing:
            raise OriginalLayoutError(
                f"the original {self.layout} layout under {self.root} lacks {len(missing)} folder(s): "
                f"{name_files(missing)}. Run the original preparation (features with SAM ViT-H into "
                f"{self.features_dir}/, masks into {MASKS_DIR}/), or lower augmentation_versions to the versions "
                "that exist."
            )

    # ----------------------------------------------------------------------------------------- entries
    def entries(self, split: str, version: int = 0) -> list[dict]:
        """One entry per frame (features file) of the split and version, in sequence/frame order."""
        if version not in self.versions(split):
            raise OriginalLayoutError(f"split {split!r} has no version {version} (it has {self.versions(split)})")
        if (split, version) not in self._indexes:
            self._indexes[(split, version)] = self._scan(split, version)
        return self._indexes[(split, version)]

    def _scan(self, split: str, version: int) -> list[dict]:
        info = self._splits[split]
        folder = info["folder"](version)
        features_root, masks_root = os.path.join(folder, self.features_dir), os.path.join(folder, MASKS_DIR)
        for path in (features_root, masks_root):
            if not os.path.isdir(path):
                raise OriginalLayoutError(
                    f"{path} not found: split {split!r} version {version} of the original "
                    f"{self.layout} layout needs it (run the original preparation)"
                )
        sequences = info["sequences"] or sorted(
            d for d in os.listdir(features_root) if os.path.isdir(os.path.join(features_root, d))
        )
        entries, orphans, bad_names = [], [], []
        for sequence in sequences:
            feature_dir = os.path.join(features_root, sequence)
            if not os.path.isdir(feature_dir):
                raise OriginalLayoutError(f"{feature_dir} not found: sequence {sequence} has no features")
            frames = sorted(f[:-4] for f in os.listdir(feature_dir) if f.endswith(".npy"))
            masks: dict[str, dict[int, str]] = {}
            mask_dir = os.path.join(masks_root, sequence)
            for name in sorted(os.listdir(mask_dir)) if os.path.isdir(mask_dir) else []:
                match = _MASK_NAME.match(name)
                if match is None:
                    if name.endswith(".png"):
                        bad_names.append(os.path.join(mask_dir, name))
                    continue
                class_id = int(match["class_id"])
                if not 1 <= class_id <= len(self._class_names):
                    raise OriginalLayoutError(
                        f"{os.path.join(mask_dir, name)}: class {class_id} is outside 1..{len(self._class_names)} "
                        f"({self._class_names}); set class_names to the dataset's classes"
                    )
                masks.setdefault(match["frame"], {})[class_id] = os.path.join(mask_dir, name)
            orphans += [os.path.join(mask_dir, f"{frame}_class*.png") for frame in sorted(set(masks) - set(frames))]
            for frame in frames:
                entries.append(
                    self._entry(
                        sequence, frame, os.path.join(feature_dir, f"{frame}.npy"), masks.get(frame, {}), folder
                    )
                )
        if bad_names:
            raise OriginalLayoutError(
                f"{len(bad_names)} mask file(s) not named <frame>_class<c>.png: {name_files(bad_names)}"
            )
        if orphans:
            raise OriginalLayoutError(
                f"{len(orphans)} frame(s) have masks but no features file in {features_root}: {name_files(orphans)}; "
                "compute their features (the original's preparation) or remove the masks."
            )
        if not entries:
            raise OriginalLayoutError(f"no features (*.npy) found for split {split!r} under {features_root}")
        self._check_features(entries[0]["embedding"])
        return entries

    def _entry(self, sequence: str, frame: str, feature_path: str, masks: dict[int, str], folder: str) -> dict:
        own = self._class_masks(masks, sequence, frame) if masks else {}
        frame_size = list(next(iter(own.values())).shape) if own else self._image_size(folder, sequence, frame)
        classes = [c for c in sorted(own) if own[c].any()]
        grid_classes = []
        if classes:
            on = (
                masks_to_embedding_grid(
                    torch.from_numpy(np.stack([own[c] for c in classes])), self.image_size, self.grid_size
                )
                .flatten(1)
                .any(1)
            )
            grid_classes = [c for c, keep in zip(classes, on.tolist()) if keep]
        return {
            "key": f"{sequence}/{frame}",
            "embedding": feature_path,
            "masks": {str(c): p for c, p in masks.items()},
            "image_folder": folder,
            "classes": classes,
            "grid_classes": grid_classes,
            "frame_size": frame_size,
        }

    def _image_size(self, folder: str, sequence: str, frame: str) -> list[int]:
        for extension in _IMAGE_EXTENSIONS:
            path = os.path.join(folder, IMAGES_DIR, sequence, frame + extension)
            if os.path.isfile(path):
                with Image.open(path) as image:
                    return [image.height, image.width]
        raise OriginalLayoutError(
            f"frame {sequence}/{frame} in {folder} has neither masks nor an image in {IMAGES_DIR}/{sequence}/: its "
            "size is unknown; add the image (or remove the features file)"
        )

    @staticmethod
    def _class_masks(masks: dict[int, str], sequence: str, frame: str) -> dict[int, np.ndarray]:
        """Binary masks {class: path} -> {class: (H, W) bool} (on above 127 of the 0/255 file), one size."""
        out: dict[int, np.ndarray] = {}
        for class_id, path in sorted(masks.items()):
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L")) > 127
            if out and mask.shape != next(iter(out.values())).shape:
                raise OriginalLayoutError(
                    f"{path} is {mask.shape} but the other masks of {sequence}/{frame} are "
                    f"{next(iter(out.values())).shape}"
                )
            out[class_id] = mask
        return out

    def _label_map(self, masks: dict[int, str], folder: str, sequence: str, frame: str) -> np.ndarray:
        """Binary masks {class: path} -> (H, W) uint8 label map (for validation); overlaps -> ignore_index."""
        own = self._class_masks(masks, sequence, frame)
        shape = next(iter(own.values())).shape
        label = np.zeros(shape, dtype=np.uint8)
        count = np.zeros(shape, dtype=np.uint8)
        for class_id, mask in own.items():
            label[mask] = class_id
            count += mask
        overlap = count > 1
        if overlap.any():
            label[overlap] = self.ignore_index
            logger.warning(
                "%s/%s in %s: %d pixels on in several class masks are ignored",
                sequence,
                frame,
                folder,
                int(overlap.sum()),
            )
        return label

    # -------------------------------------------------------------------------------------------- load
    def _check_features(self, path: str) -> np.ndarray:
        try:
            features = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise OriginalLayoutError(
                f"{path} could not be read as .npy ({error}): recompute that frame's features"
            ) from None
        expected = (*self.grid_size, self.embed_dim)
        if features.shape != expected or features.dtype != np.float32:
            raise OriginalLayoutError(
                f"{path} holds {features.dtype} {features.shape}, expected float32 {expected} (h, w, d: SAM "
                f"{self.features_dir} features as the original writes them); check sam_variant and the features folder"
            )
        return features

    def load(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embedding (d, h, w) float32 (the file's (h, w, d) transposed), label map (H, W) long."""
        features = self._check_features(entry["embedding"])
        embedding = torch.from_numpy(np.ascontiguousarray(np.transpose(features, (2, 0, 1))))
        masks = {int(c): p for c, p in entry["masks"].items()}
        if masks:
            sequence, frame = entry["key"].rsplit("/", 1)
            label = self._label_map(masks, entry["image_folder"], sequence, frame)
        else:
            label = np.zeros(entry["frame_size"], dtype=np.uint8)
        return embedding, torch.from_numpy(label.astype(np.int64))

    def load_class_mask(self, entry: dict, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embedding (d, h, w) float32, class ``class_id``'s own mask (H, W) bool (all off where the frame
        has no mask of that class): a training sample's target, overlaps with other classes kept."""
        features = self._check_features(entry["embedding"])
        embedding = torch.from_numpy(np.ascontiguousarray(np.transpose(features, (2, 0, 1))))
        path = entry["masks"].get(str(int(class_id)))
        if path is None:
            return embedding, torch.zeros(tuple(entry["frame_size"]), dtype=torch.bool)
        sequence, frame = entry["key"].rsplit("/", 1)
        return embedding, torch.from_numpy(self._class_masks({int(class_id): path}, sequence, frame)[int(class_id)])

    @property
    def frame_size(self) -> list[int]:
        """(H, W) of the validation frames (from their masks or images): the config's frame_size."""
        return list(self.entries("validation", 0)[0]["frame_size"])


def check_original_layout_inputs(
    reader: OriginalLayoutReader,
    splits: Sequence[str],
    sam_variant: str,
    sam_checkpoint: str | None,
    model_file: str | None = None,
    frame_size: Sequence[int] | None = None,
) -> None:
    """The original-layout counterpart of ``engines.check_training_inputs``: every problem named at once.

    ``frame_size`` (the config's) must equal the size of the validation frames (read from their masks or
    images), since the network returns its logits at that size.
    """
    from ..sam.backbone import missing_sam_weights
    from .layout import raise_input_problems

    problems = []
    try:
        reader.check(splits)
    except OriginalLayoutError as error:
        problems.append(f"data: {error}")
    else:
        if frame_size is not None:
            split = splits[-1]
            try:
                found = list(reader.entries(split, 0)[0]["frame_size"])
            except OriginalLayoutError as error:
                problems.append(f"data: {error}")
            else:
                if found != [int(x) for x in frame_size]:
                    problems.append(
                        f"frame size: the {split!r} frames are {found} but frame_size is {list(frame_size)}:"
                        f' pass --frame_size "{found}"'
                    )
    problems += missing_sam_weights(sam_variant, sam_checkpoint)
    if model_file is not None and not os.path.isfile(model_file):
        problems.append(
            f"model: {model_file} not found. Train first, convert an original checkpoint "
            "(surgical-sam convert_original_checkpoint) or pass --model_file PATH."
        )
    raise_input_problems(problems, "run on the original layout")
