"""Does the annotation loop make the served model better on a new site? Measured against a running app.

Uploads the frames of a new-site video (``surgical-sam``'s demo makes one: ``scripts.data.demo.new_site``)
into the server's datastore as ``<video>_<frame>`` with the image info ``{"video": <video>}``, saves the
labels of ``--label_frames`` of them spread along the video (PUT /datastore/label), scores the served
model on the other frames of that video and on the validation frames of the data it was trained on
(``--dataset_dir``, never labelled), runs one ``POST /train/surgicalsam`` with an empty body (the app's
defaults), and scores the model served then. Writes one JSON object to ``--json``:

- ``new_site_before`` / ``new_site_after``: Challenge IoU (percent, automatic protocol) on the video's
  unlabelled frames;
- ``validation_before`` / ``validation_after``: the same on ``--dataset_dir``'s validation frames;
- ``frames_labelled``: the image ids labelled; ``replaced``: whether /train replaced the served model;
  ``train_seconds``, ``train_result`` (the task's result: reason, scores, validation frames).

    python tools/annotation_loop_check.py --url http://127.0.0.1:8000 --json loop.json \\
        --bundle monailabel_app/model/surgicalsam --dataset_dir bundle/data/demo --new_site bundle/data/demo_new_site

The token is ``--token`` or ``$SURGICALSAM_TOKEN``. Runs in the main environment with the served bundle's
``scripts`` (as tools/monailabel_finetune_check.py, whose requests and scoring it uses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from monailabel_finetune_check import _request, held_out_scores, put_label, train, train_result  # noqa: E402


def _validation_items(dataset_dir: str) -> list[dict]:
    with open(os.path.join(dataset_dir, "dataset.json")) as handle:
        return json.load(handle)["validation"]


def labelled_positions(count: int, frames: int) -> list[int]:
    """``count`` frame positions of ``frames`` spread evenly along a video (the middle of equal parts)."""
    if not 0 < count < frames:
        raise ValueError(f"label between 1 and {frames - 1} frames of a {frames}-frame video, not {count}")
    return [int((index + 0.5) * frames / count) for index in range(count)]


def upload_video(url: str, new_site: str) -> list[tuple[str, dict]]:
    """PUT every frame of the new-site video into the datastore with its video as image info; returns
    [(image id, dataset item)] in frame order."""
    uploaded = []
    for item in _validation_items(new_site):
        image_id = f"{item['sequence']}_{item['frame']}"
        status, answer = _upload(url, image_id, os.path.join(new_site, item["image"]))
        if status != 200:
            raise RuntimeError(f"PUT /datastore/image {image_id} answered {status}: {answer[:300]!r}")
        status, answer = _request(
            f"{url}/datastore/image/info?image={image_id}",
            "PUT",
            *_form({"info": json.dumps({"video": item["sequence"], "frame_index": int(item["frame"])})}),
        )
        if status != 200:
            raise RuntimeError(f"PUT /datastore/image/info {image_id} answered {status}: {answer[:300]!r}")
        uploaded.append((image_id, item))
    return uploaded


def _form(fields: dict, files: dict | None = None) -> tuple[bytes, dict]:
    boundary = "annotationloopcheckboundary"
    body = b""
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, (filename, content) in (files or {}).items():
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _upload(url: str, image_id: str, frame_file: str) -> tuple[int, bytes]:
    with open(frame_file, "rb") as handle:
        body, headers = _form({}, {"file": ("frame.png", handle.read())})
    return _request(f"{url}/datastore/image?image={image_id}", "PUT", body, headers)


def _scores(bundle: str, model_file: str, new_site_subset: str, dataset_dir: str) -> tuple[float, float]:
    return (
        held_out_scores(bundle, model_file, new_site_subset)["challenge_iou"],
        held_out_scores(bundle, model_file, dataset_dir)["challenge_iou"],
    )


def check(url: str, bundle: str, dataset_dir: str, new_site: str, label_frames: int, train_timeout: float) -> dict:
    uploaded = upload_video(url, new_site)
    positions = labelled_positions(label_frames, len(uploaded))
    labelled = [uploaded[p] for p in positions]
    for image_id, item in labelled:
        put_label(url, image_id, os.path.join(new_site, item["label"]))
    unlabelled = [item for index, (_, item) in enumerate(uploaded) if index not in positions]
    model_file = os.path.join(bundle, "models", "model.pt")
    with tempfile.TemporaryDirectory() as subset:  # the unlabelled frames as a dataset's validation split
        with open(os.path.join(new_site, "dataset.json")) as handle:
            description = json.load(handle)
        description["validation"] = [
            {**item, "image": os.path.abspath(os.path.join(new_site, item["image"])),
             "label": os.path.abspath(os.path.join(new_site, item["label"]))}
            for item in unlabelled
        ]  # fmt: skip
        with open(os.path.join(subset, "dataset.json"), "w") as handle:
            json.dump(description, handle)
        new_site_before, validation_before = _scores(bundle, model_file, subset, dataset_dir)
        start = time.perf_counter()
        task = train(url, {}, train_timeout)
        seconds = round(time.perf_counter() - start, 1)
        if task["status"] != "DONE":
            raise RuntimeError("training ended in " + task["status"] + ": " + " | ".join(task.get("details", [])[-5:]))
        result = train_result(task)
        new_site_after, validation_after = _scores(bundle, model_file, subset, dataset_dir)
    return {
        "new_site_before": new_site_before,
        "new_site_after": new_site_after,
        "validation_before": validation_before,
        "validation_after": validation_after,
        "frames_labelled": [image_id for image_id, _ in labelled],
        "new_site_frames_scored": len(unlabelled),
        "replaced": result["served_model"] == "replaced",
        "train_seconds": seconds,
        "train_result": result,
    }


def make_new_site(bundle: str, dataset_dir: str, new_site: str) -> None:
    """The demo's new-site video at ``new_site``, of the frame size and classes of ``dataset_dir``."""
    sys.path.insert(0, os.path.abspath(bundle))
    from scripts.data.demo.new_site import make_new_site_video

    with open(os.path.join(dataset_dir, "dataset.json")) as handle:
        description = json.load(handle)
    make_new_site_video(new_site, frame_size=description["frame_size"], num_classes=len(description["classes"]))
    print(f"new-site video written to {new_site}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the running app, e.g. http://127.0.0.1:8000")
    parser.add_argument("--json", required=True, help="where the figures go (JSON)")
    parser.add_argument("--token", help="the server's access token (default: $SURGICALSAM_TOKEN)")
    parser.add_argument("--bundle", default="monailabel_app/model/surgicalsam", help="the served bundle folder")
    parser.add_argument("--dataset_dir", default="bundle/data/demo", help="the served model's training data")
    parser.add_argument(
        "--new_site", default="bundle/data/demo_new_site", help="the new-site video (dataset folder; made if missing)"
    )
    parser.add_argument("--label_frames", type=int, default=8)
    parser.add_argument("--train_timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.token:
        os.environ["SURGICALSAM_TOKEN"] = args.token
    for folder in (args.bundle, args.dataset_dir):
        if not os.path.isdir(folder):
            parser.error(f"{folder} is not a folder")
    if not os.path.isfile(os.path.join(args.new_site, "dataset.json")):
        make_new_site(args.bundle, args.dataset_dir, args.new_site)
    figures = check(
        args.url.rstrip("/"), args.bundle, args.dataset_dir, args.new_site, args.label_frames, args.train_timeout
    )
    temporary = args.json + ".partial"
    with open(temporary, "w") as handle:
        json.dump(figures, handle, indent=2)
    shutil.move(temporary, args.json)
    print(json.dumps({k: v for k, v in figures.items() if k != "train_result"}, indent=2))


if __name__ == "__main__":
    main()
