"""Frames in from a video file or a folder of frames, one at a time; an overlay video out.

Decoding and encoding use PyAV (``av``): FFmpeg's own decoders behind a Python API, installed from the
package registry with FFmpeg inside its wheels (no system FFmpeg), reading every container the bundle
accepts (mp4, avi, mov, mkv) frame by frame, so memory stays constant whatever the video's length.

:func:`open_sequence` gives a :class:`FrameSequence`: frames (H, W, 3) uint8 RGB with their index in
the source (0-based, before any stride) and time, optionally every ``stride``-th frame within a time
range. A video that cannot be opened, that ends before the frames its container announces (a
truncated file), or whose decoder reports damaged frames (bytes damaged mid-file: FFmpeg conceals the
errors and marks the frame corrupt) raises :class:`VideoError` after every good frame has been given out;
damaged frames are not given out, and are named (index and time) in ``FrameSequence.damaged_frames``.
The decoder finds damage where the bitstream breaks its rules; bytes that still decode as valid ones
cannot be told from the picture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import temporary_path
from .frame_files import read_frame
from .layout import DatasetError
from .overlay import OVERLAY_COLOURS, overlay

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


class VideoError(DatasetError):
    """A video that cannot be read, that ends early or has damaged frames; the message says what was read and
    what to do."""


@dataclass(frozen=True)
class Frame:
    """One frame of a sequence: ``index`` in the source (0-based), ``time`` in seconds, ``image`` (H, W, 3) uint8."""

    index: int
    time: float
    image: np.ndarray


def is_video(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)


class FrameSequence:
    """Iterate the frames of a video file or a folder of frames (sorted file names) as one sequence.

    Args:
        source: a video file (mp4, avi, mov, mkv) or a folder of frames.
        stride: keep every ``stride``-th source frame (indices 0, stride, 2*stride, ... of the source).
        start_time, end_time: keep frames with ``start_time <= time < end_time`` seconds (None: no bound).
        folder_fps: frame rate given to a folder of frames (its frames' times and the overlay video's rate).
    """

    def __init__(
        self,
        source: str,
        stride: int = 1,
        start_time: float | None = None,
        end_time: float | None = None,
        folder_fps: float = 25.0,
    ) -> None:
        if int(stride) < 1:
            raise ValueError(f"frame stride must be >= 1, got {stride}")
        if start_time is not None and end_time is not None and float(end_time) <= float(start_time):
            raise ValueError(f"end_time ({end_time}) must be after start_time ({start_time})")
        if float(folder_fps) <= 0:
            raise ValueError(f"folder_fps must be > 0, got {folder_fps}")
        self.source, self.stride = str(source), int(stride)
        self.start_time = None if start_time is None else float(start_time)
        self.end_time = None if end_time is None else float(end_time)
        self.is_video = os.path.isfile(self.source)
        self._count_slack = 0  # frames a duration-derived count may be off by
        #: frames the decoder reported damaged, ``{"index", "time"}``, and the count of decoder errors (those
        #: frames, and a packet that failed to decode), filled while the sequence is read
        self.damaged_frames: list[dict] = []
        self.decode_errors = 0
        if self.is_video:
            if not self.source.lower().endswith(VIDEO_EXTENSIONS):
                raise VideoError(
                    f"{self.source} is not a video file the bundle reads ({', '.join(VIDEO_EXTENSIONS)}) "
                    "nor a folder of frames: pass one of those"
                )
            self.fps, self.declared_frames = self._probe()
            self._files: list[str] = []
        elif os.path.isdir(self.source):
            from .transforms import list_frames

            self._files = [item["image"] for item in list_frames(self.source)]
            self.fps, self.declared_frames = float(folder_fps), len(self._files)
        else:
            raise VideoError(
                f"{self.source} does not exist: pass a video file ({', '.join(VIDEO_EXTENSIONS)}) or a folder of frames"
            )

    def _open(self):
        import av

        try:
            return av.open(self.source)
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoError(
                f"cannot open video {self.source}: {error}. The file is not a readable video (corrupt, "
                "or cut before its header): check it plays, or re-encode it, e.g. "
                "ffmpeg -i IN -c:v libx264 OUT.mp4"
            ) from None

    def _probe(self) -> tuple[float, int]:
        with self._open() as container:
            if not container.streams.video:
                raise VideoError(f"{self.source} has no video stream: pass a video file or a folder of frames")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise VideoError(
                    f"{self.source}: the frame rate cannot be read from the file; re-encode it "
                    "(ffmpeg -i IN -c:v libx264 OUT.mp4)"
                )
            frames = int(stream.frames or 0)
            if not frames and container.duration:  # containers without a frame count (mkv): from the duration
                frames = int(round(container.duration / 1_000_000 * float(rate)))
                self._count_slack = 1
            return float(rate), frames

    def expected_frames(self) -> int | None:
        """Frames this sequence will give (stride and range applied), where the source says how many it has."""
        total = self.declared_frames
        if not total:
            return None
        first = 0 if self.start_time is None else math.ceil(self.start_time * self.fps - 1e-9)
        last = total if self.end_time is None else min(total, math.ceil(self.end_time * self.fps - 1e-9))
        first = first + (-first) % self.stride
        return max(0, (last - first + self.stride - 1) // self.stride)

    def _wanted(self, index: int, time: float) -> bool | None:
        """True: keep; False: skip; None: past the end of the range (stop)."""
        if self.end_time is not None and time >= self.end_time - 1e-9:
            return None
        if self.start_time is not None and time < self.start_time - 1e-9:
            return False
        return index % self.stride == 0

    def __iter__(self) -> Iterator[Frame]:
        return self._iter_video() if self.is_video else self._iter_folder()

    def _iter_folder(self) -> Iterator[Frame]:
        for index, path in enumerate(self._files):
            time = index / self.fps
            wanted = self._wanted(index, time)
            if wanted is None:
                return
            if wanted:
                yield Frame(index, time, np.ascontiguousarray(read_frame(path)))

    def _iter_video(self) -> Iterator[Frame]:
        import av

        decoded, problem, past_range = 0, None, False
        self.damaged_frames, self.decode_errors = [], 0
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            packets = container.demux(stream)
            while not past_range:
                try:
                    packet = next(packets)
                    # the last (empty) packet flushes the decoder; after a damaged packet flush it by hand,
                    # so that the frames it still holds (B-frame reordering) are not lost
                    images = packet.decode()
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError, ValueError) as error:
                    problem = str(error)
                    self.decode_errors += 1
                    try:
                        images = stream.codec_context.decode(None)
                    except (av.error.FFmpegError, OSError, ValueError):
                        images = []
                for image in images:
                    index, decoded = decoded, decoded + 1
                    time = index / self.fps
                    wanted = self._wanted(index, time)
                    if wanted is None:
                        past_range = True
                        break
                    if wanted and getattr(image, "is_corrupt", False):  # FFmpeg concealed decoding errors
                        self.damaged_frames.append({"index": index, "time": round(time, 6)})
                        self.decode_errors += 1
                    elif wanted:
                        yield Frame(index, time, image.to_ndarray(format="rgb24"))
                if problem is not None:
                    break
        short = not past_range and self.declared_frames and decoded < self.declared_frames - self._count_slack
        reasons = []
        if self.damaged_frames:
            named = ", ".join(f"{f['index']} (at {f['time']:.3f} s)" for f in self.damaged_frames[:20])
            more = f" and {len(self.damaged_frames) - 20} more" if len(self.damaged_frames) > 20 else ""
            reasons.append(
                f"{len(self.damaged_frames)} damaged frame(s) that the decoder could not restore were not "
                f"segmented: {named}{more} (frames after them up to the next key frame may carry the "
                "damage too)"
            )
        if problem is not None or short:
            reasons.append(
                f"it ends early: {decoded} frames decoded "
                f"({problem or f'the container announces {self.declared_frames} frames'})"
            )
        if reasons:
            raise VideoError(
                f"video {self.source}: {'; '.join(reasons)}. The file is truncated or damaged; the output "
                "of every good frame is kept. Re-encode or re-copy the video and run again: frames "
                "already written are skipped."
            )


def open_sequence(
    source: str,
    stride: int = 1,
    start_time: float | None = None,
    end_time: float | None = None,
    folder_fps: float = 25.0,
) -> FrameSequence:
    """A :class:`FrameSequence` over ``source`` (a video file or a folder of frames)."""
    return FrameSequence(source, stride, start_time, end_time, folder_fps)


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The overlay colour of label ``class_id`` (1..C), as :func:`~.overlay.overlay` tints it."""
    return tuple(OVERLAY_COLOURS[(int(class_id) - 1) % len(OVERLAY_COLOURS)])


def legend_panel(class_names: Sequence[str], height: int) -> np.ndarray:
    """A legend (height, W, 3) uint8: a colour swatch and the name of each class, one per row, on black.

    Rows are as tall as fits ``height`` (at least 10 pixels; classes that do not fit are left out and the
    last row says how many)."""
    font = ImageFont.load_default()
    row = max(10, min(18, height // max(1, len(class_names))))
    fits = max(1, height // row)
    shown = list(enumerate(class_names, start=1))
    if len(shown) > fits:
        shown = shown[: fits - 1] + [(0, f"+{len(shown) - fits + 1} more")]
    width = 8 + row + max(int(font.getlength(name)) for _, name in shown) + 6
    width += width % 2  # even sizes for yuv420p
    panel = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(panel)
    for position, (class_id, name) in enumerate(shown):
        top = position * row + 2
        if class_id:
            draw.rectangle([4, top, 4 + row - 5, top + row - 5], fill=class_colour(class_id))
        draw.text((8 + row, top - 1), name, fill=(255, 255, 255), font=font)
    return np.asarray(panel)


class OverlayVideoWriter:
    """Write frames tinted by their label maps, with a class legend beside them, as an H.264 video.

    Args:
        path: the video to write (``.mp4``).
        fps: its frame rate (the source's, divided by the frame stride).
        class_names: C names, label values 1..C, for the legend.
        alpha: tint strength.
    """

    def __init__(self, path: str, fps: float, class_names: Sequence[str], alpha: float = 0.5) -> None:
        self.path, self.fps, self.class_names, self.alpha = path, float(fps), list(class_names), alpha
        self._container = self._stream = self._legend = None
        self._partial = temporary_path(path, keep_suffix=True)  # moved into place by close()

    def write(self, image: np.ndarray, label_map: np.ndarray) -> None:
        """image (H, W, 3) uint8, label_map (H, W) with values 0..C."""
        from fractions import Fraction

        import av

        tinted = overlay(image, label_map, self.alpha)
        if self._container is None:
            self._legend = legend_panel(self.class_names, tinted.shape[0] + tinted.shape[0] % 2)
            self._container = av.open(self._partial, "w", format="mp4", options={"movflags": "+faststart"})
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width = tinted.shape[1] + tinted.shape[1] % 2 + self._legend.shape[1]
            self._stream.height = self._legend.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "18"}
        padded = np.zeros((self._stream.height, self._stream.width, 3), dtype=np.uint8)
        padded[: tinted.shape[0], : tinted.shape[1]] = tinted
        padded[:, -self._legend.shape[1] :] = self._legend
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        """Finish the file (an overlay video is only in place once it is complete)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._partial, self.path)


def write_video(
    path: str, frames: Sequence[np.ndarray] | Iterator[np.ndarray], fps: float, codec: str = "libx264"
) -> str:
    """Encode frames (H, W, 3) uint8 (even H and W for H.264) as a video; the container follows the suffix
    (mp4 and mov with their index first, so that a player, or this module, can read a partial copy)."""
    from fractions import Fraction

    import av

    options = {"movflags": "+faststart"} if path.lower().endswith((".mp4", ".mov")) else {}
    with av.open(path, "w", options=options) as container:
        stream = None
        for image in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001))
                stream.width, stream.height = image.shape[1], image.shape[0]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("write_video needs at least one frame")
        for packet in stream.encode():
            container.mux(packet)
    return path


def frames_to_even(image: np.ndarray) -> np.ndarray:
    """Crop a frame (H, W, 3) to even H and W (what H.264's yuv420p needs)."""
    return image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
