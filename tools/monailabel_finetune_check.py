"""Does a /train from a running SurgicalSAM MONAI Label app make the served model worse on held-out frames?

Labels the first N training frames (or the ones named) of a prepared dataset through the server (PUT /datastore/label), scores
the served ``models/model.pt`` on the dataset's validation frames (never labelled, never trained on) under
the automatic protocol, runs one POST /train/surgicalsam, and scores the model the server serves then.
Prints one JSON object: Challenge IoU before and after, the wrong extra classes (a class found in a frame
whose label has none of it) before and after, and the train task's result (served model replaced or kept).

    python tools/monailabel_finetune_check.py --make_studies STUDIES --dataset_dir DATA   # the datastore
    monailabel start_server --app monailabel_app --studies STUDIES --host 127.0.0.1 --port 8000 &
    python tools/monailabel_finetune_check.py --url http://127.0.0.1:8000 --dataset_dir DATA \\
        --bundle monailabel_app/model/surgicalsam --label_frames 4 --train '{"max_epochs": 10}'

The server's access token is read from ``$SURGICALSAM_TOKEN`` (sent as ``Authorization: Bearer``).
The datastore's image ids are ``<sequence>_<frame>`` (what ``--make_studies`` copies the training frames as).
Bounded: fixed counts, every request has a timeout, training is waited for at most ``--train_timeout`` s.
Runs in the main environment with the served bundle's ``scripts``, not MONAI Label's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import torch


def _items(dataset_dir: str, split: str) -> list[dict]:
    with open(os.path.join(dataset_dir, "dataset.json")) as handle:
        return json.load(handle)[split]


def _image_id(item: dict) -> str:
    return f"{item['sequence']}_{item['frame']}"


def make_studies(studies: str, dataset_dir: str) -> int:
    """Copy the dataset's training frames into ``studies`` as ``<sequence>_<frame>.png``; returns how many."""
    os.makedirs(studies, exist_ok=True)
    items = _items(dataset_dir, "training")
    for item in items:
        shutil.copyfile(os.path.join(dataset_dir, item["image"]), os.path.join(studies, _image_id(item) + ".png"))
    return len(items)


def _request(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None, timeout: float = 120.0
) -> tuple[int, bytes]:
    token = os.environ.get("SURGICALSAM_TOKEN")
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def multipart_file(field: str, path: str) -> tuple[bytes, dict]:
    """(body, headers) of a multipart form holding the file ``path`` as ``field``."""
    boundary = uuid.uuid4().hex
    with open(path, "rb") as handle:
        content = handle.read()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{os.path.basename(path)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def put_label(url: str, image_id: str, label_file: str) -> None:
    body, headers = multipart_file("label", label_file)
    status, answer = _request(f"{url}/datastore/label?image={image_id}&tag=final", "PUT", body, headers)
    if status != 200:
        raise RuntimeError(f"PUT label of {image_id} answered {status}: {answer[:300]!r}")


def train(url: str, settings: dict, timeout: float) -> dict:
    status, answer = _request(
        f"{url}/train/surgicalsam", "POST", json.dumps(settings).encode(), {"Content-Type": "application/json"}
    )
    if status != 200:
        raise RuntimeError(f"POST /train answered {status}: {answer[:300]!r}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = json.loads(_request(f"{url}/train/?check_if_running=false")[1])
        if task.get("status") in ("DONE", "ERROR"):
            return task
        time.sleep(2)
    raise TimeoutError(f"training did not finish within {timeout} s")


def train_result(task: dict) -> dict:
    for line in reversed(task.get("details", [])):
        if "{" in line and '"served_model"' in line:
            return json.loads(line[line.index("{") :])
    raise RuntimeError("no result in the train status: " + " | ".join(task.get("details", [])[-5:]))


def held_out_scores(bundle: str, model_file: str, dataset_dir: str, device: str = "cpu") -> dict:
    """Challenge IoU (percent) and wrong extra classes of ``model_file`` on the validation frames, with the
    network, inferer and presence threshold of the served bundle's inference.json (automatic protocol), and
    the served bundle's own ``scripts`` (its folder first on ``sys.path``, as MONAI Label imports it)."""
    import sys

    from monai.bundle import ConfigParser

    sys.path.insert(0, os.path.abspath(bundle))
    from scripts.data.frame_files import read_frame, read_label_map
    from scripts.evaluation.metrics import EndoVisMetric
    from scripts.monailabel_glue.bundle_folder import load_model_state

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser["bundle_root"], parser["device"] = bundle, device
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(load_model_state(model_file))
    inferer, num_classes = parser.get_parsed_content("inferer"), int(parser.get_parsed_content("num_classes"))
    metric, wrong_extra = EndoVisMetric(num_classes), 0
    items = _items(dataset_dir, "validation")
    for item in items:
        frame = torch.from_numpy(read_frame(os.path.join(dataset_dir, item["image"]))).permute(2, 0, 1)[None].float()
        label = torch.from_numpy(read_label_map(os.path.join(dataset_dir, item["label"]), num_classes)).long()
        with torch.no_grad():
            pred = inferer(frame, network).long().reshape(label.shape)
        wrong_extra += len(set(np.unique(pred.numpy())) - set(np.unique(label.numpy())) - {0})
        metric.update((pred[None], label[None]))
    return {
        "challenge_iou": round(float(metric.compute()["challenge_iou"]), 2),
        "wrong_extra_classes": wrong_extra,
        "frames": len(items),
    }


def check(
    url: str,
    bundle: str,
    dataset_dir: str,
    label_frames: int,
    settings: dict,
    train_timeout: float,
    label_ids: list[str] | None = None,
) -> dict:
    model_file = os.path.join(bundle, "models", "model.pt")
    training = _items(dataset_dir, "training")
    if label_ids:
        by_id = {_image_id(item): item for item in training}
        unknown = [i for i in label_ids if i not in by_id]
        if unknown:
            raise ValueError(f"not training frames of {dataset_dir}: {unknown} (ids are <sequence>_<frame>)")
        labelled = [by_id[i] for i in label_ids]
    else:
        labelled = training[:label_frames]
    for item in labelled:
        put_label(url, _image_id(item), os.path.join(dataset_dir, item["label"]))
    before = held_out_scores(bundle, model_file, dataset_dir)
    start = time.perf_counter()
    task = train(url, {"device": "cpu", **settings}, train_timeout)
    seconds = round(time.perf_counter() - start, 1)
    if task["status"] != "DONE":
        raise RuntimeError("training ended in " + task["status"] + ": " + " | ".join(task.get("details", [])[-5:]))
    result = train_result(task)
    return {
        "labelled": [_image_id(item) for item in labelled],
        "settings": settings,
        "before": before,
        "after": held_out_scores(bundle, model_file, dataset_dir),
        "train_seconds": seconds,
        "served_model": result["served_model"],
        "reason": result["reason"],
        "validation_frames": result.get("validation_frames"),
        "epochs_run": result.get("epochs_run"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True, help="a prepared dataset (dataset.json)")
    parser.add_argument("--make_studies", help="copy the training frames into this folder (the datastore) and stop")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bundle", help="the bundle folder the server serves (its models/model.pt is read)")
    parser.add_argument("--label_frames", type=int, default=4, help="label the first N training frames")
    parser.add_argument("--labels", help="or label these image ids (comma-separated <sequence>_<frame>)")
    parser.add_argument("--train", default="{}", help="JSON body of POST /train/surgicalsam (device cpu unless given)")
    parser.add_argument("--train_timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.make_studies:
        print(f"{make_studies(args.make_studies, args.dataset_dir)} frames copied to {args.make_studies}")
        return
    if not args.bundle:
        parser.error("--bundle is needed (the served bundle folder)")
    label_ids = [i.strip() for i in args.labels.split(",") if i.strip()] if args.labels else None
    print(
        json.dumps(
            check(
                args.url,
                args.bundle,
                args.dataset_dir,
                args.label_frames,
                json.loads(args.train),
                args.train_timeout,
                label_ids,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
