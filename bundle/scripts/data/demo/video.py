"""The demo data as a short video: the held-out (validation) sequences of the demo dataset, one after the
other, as one H.264 mp4 (``<demo>/videos/validation.mp4``), for the video demo of the README.

The demo's frames are drawn as consecutive video frames (:mod:`.scene`), so the video is what a newcomer's
own recording would be; ``run`` on it (inference.yaml, inference_video.yaml, demo_inference.yaml and demo_video.yaml)
writes the overlay video.
"""

from __future__ import annotations

import os

from ...files import atomic_write
from ..frame_files import read_frame
from ..layout import DatasetError, load_datalist, read_dataset_description
from ..video_io import write_video

VIDEOS_DIR = "videos"
DEMO_VIDEO = "validation.mp4"


def ensure_demo_video(demo_dir: str, fps: float = 8.0, split: str = "validation") -> str:
    """Write ``<demo_dir>/videos/validation.mp4`` from the demo's ``split`` frames unless it is there and newer
    than ``dataset.json``; return its path.

    Raises:
        DatasetError: there is no demo dataset in ``demo_dir`` (make it with ``surgical-sam demo``).
    """
    description = os.path.join(demo_dir, "dataset.json")
    if not os.path.isfile(description):
        raise DatasetError(f"no demo dataset in {demo_dir}: run `surgical-sam demo` first")
    path = os.path.join(demo_dir, VIDEOS_DIR, DEMO_VIDEO)
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(description):
        return path
    read_dataset_description(demo_dir)  # a clear error for a damaged description
    items = sorted(load_datalist(demo_dir, split), key=lambda item: (item["sequence"], item["frame"]))
    if not items:
        raise DatasetError(f"the demo dataset in {demo_dir} has no {split} frames to make its video from")
    frames = (read_frame(os.path.join(demo_dir, item["image"])) for item in items)
    return atomic_write(path, lambda temporary: write_video(temporary, frames, fps), keep_suffix=True)
