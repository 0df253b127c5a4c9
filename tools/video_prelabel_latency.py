"""Latency of pre-labelling a whole video through a running SurgicalSAM MONAI Label server (test side).

Uploads the video as one item (``PUT /video/<id>``), pre-labels it (``POST /batch/infer/surgicalsam`` with
``{"video": id}``, run synchronously), saves ``--review`` of its pre-labels as a person's labels (as the review
page's "Save" of an unchanged frame), optionally trains (``--train`` JSON settings), and pre-labels the
video's unreviewed frames again. Prints (and with ``--json`` writes) the seconds of each step.

    python tools/video_prelabel_latency.py --make_video demo100.mp4 --dataset_dir bundle/data/demo --frames 100
    SURGICALSAM_TOKEN=... python tools/video_prelabel_latency.py --url http://127.0.0.1:8000 --video demo100.mp4

The server's access token: ``$SURGICALSAM_TOKEN``. Bounded: every request has a timeout, nothing retries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from monailabel_finetune_check import _request, multipart_file, put_label, train


def make_video(path: str, dataset_dir: str, frames: int, fps: float = 8.0) -> str:
    """A video of the dataset's first ``frames`` frames (validation sequences first, then training; each
    split in sequence and frame order), with this repository's bundle ``scripts``."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle"))
    from scripts.data.frame_files import read_frame
    from scripts.data.layout import load_datalist
    from scripts.data.video_io import write_video

    items = []
    for split in ("validation", "training"):
        items += sorted(load_datalist(dataset_dir, split), key=lambda item: (item["sequence"], item["frame"]))
    if len(items) < frames:
        raise SystemExit(f"{dataset_dir} has {len(items)} frames, fewer than --frames {frames}")
    return write_video(path, (read_frame(os.path.join(dataset_dir, i["image"])) for i in items[:frames]), fps)


def _timed_json(url: str, method: str, body: bytes | None, headers: dict, timeout: float) -> tuple[float, dict]:
    start = time.perf_counter()
    status, answer = _request(url, method, body, headers, timeout)
    seconds = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"{method} {url} answered {status}: {answer[:300]!r}")
    return seconds, json.loads(answer)


def upload(url: str, video_id: str, video_file: str, timeout: float) -> tuple[float, dict]:
    body, headers = multipart_file("file", video_file)
    return _timed_json(f"{url}/video/{video_id}", "PUT", body, headers, timeout)


def pre_label(url: str, video_id: str, timeout: float) -> tuple[float, dict]:
    body = json.dumps({"video": video_id}).encode()
    headers = {"Content-Type": "application/json"}
    return _timed_json(f"{url}/batch/infer/surgicalsam?run_sync=true", "POST", body, headers, timeout)


def review(url: str, video_id: str, count: int) -> list[str]:
    """Save ``count`` evenly spaced pre-labels of the video unchanged as a person's labels (tag final)."""
    frames = json.loads(_request(f"{url}/video/{video_id}")[1])["frames"]
    chosen = [frames[round(i * (len(frames) - 1) / max(1, count - 1))]["id"] for i in range(count)] if count else []
    with tempfile.TemporaryDirectory() as folder:
        for image_id in chosen:
            status, label = _request(f"{url}/datastore/label?label={image_id}&tag=original")
            if status != 200:
                raise RuntimeError(f"no pre-label of {image_id} ({status})")
            path = os.path.join(folder, f"{image_id}.png")
            with open(path, "wb") as handle:
                handle.write(label)
            put_label(url, image_id, path)
    return chosen


def measure(url: str, video_file: str, video_id: str, reviewed: int, train_settings: dict | None, timeout: float):
    figures = {"video": video_file, "video_id": video_id}
    figures["upload_s"], stored = upload(url, video_id, video_file, timeout)
    figures["frames"] = stored["frames"]
    figures["pre_label_s"], report = pre_label(url, video_id, timeout)
    figures["pre_labelled"] = report["ok"]
    figures["reviewed"] = len(review(url, video_id, reviewed))
    if train_settings is not None:
        start = time.perf_counter()
        task = train(url, train_settings, timeout)
        figures["train_s"], figures["train_status"] = round(time.perf_counter() - start, 3), task.get("status")
    figures["re_pre_label_s"], report = pre_label(url, video_id, timeout)
    figures["re_pre_labelled"] = report["ok"]
    for key in ("upload_s", "pre_label_s", "re_pre_label_s"):
        figures[key] = round(figures[key], 3)
    figures["pre_label_ms_per_frame"] = round(1000 * figures["pre_label_s"] / max(1, figures["pre_labelled"]), 1)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--video", help="the video file to upload (mp4)")
    parser.add_argument("--video_id", default=f"latency{int(time.time())}")
    parser.add_argument("--review", type=int, default=8, help="pre-labels saved as reviewed before pre-labelling again")
    parser.add_argument("--train", help="train between the two pre-labellings with these settings (JSON)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--make_video", help="write a video of --dataset_dir's first --frames frames here and stop")
    parser.add_argument("--dataset_dir")
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args(argv)
    if args.make_video:
        if not args.dataset_dir:
            parser.error("--make_video needs --dataset_dir")
        print(make_video(args.make_video, args.dataset_dir, args.frames))
        return
    if not args.url or not args.video:
        parser.error("give --url and --video (or --make_video)")
    settings = json.loads(args.train) if args.train else None
    figures = measure(args.url.rstrip("/"), args.video, args.video_id, args.review, settings, args.timeout)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
