"""A bounded load measurement of a running SurgicalSAM MONAI Label server (test side; loopback by default).

Sends N automatic inferences one after another, then N from 4 clients at once, and while the 4-way run
goes, polls GET /info/ to see whether the server still answers it. Then times each read-only endpoint the
app serves (``--repeats`` calls each, one after another: info, datastore listing and frame download, the
review page, each inference model, scoring, active learning). Prints latency figures (median and max per
request, wall time, /info/ latency during inference, per endpoint) as one JSON object.

    SURGICALSAM_TOKEN=... python tools/monailabel_load.py --url http://127.0.0.1:8000 --image seq1_00000 --requests 8

The server's access token: ``--token``, else ``$SURGICALSAM_TOKEN`` (sent as ``Authorization: Bearer``).
Bounded: every request has a timeout, the counts are fixed, nothing retries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor


def _auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _timed(
    url: str,
    method: str = "GET",
    form: dict | None = None,
    json_body: dict | None = None,
    timeout: float = 120.0,
    token: str | None = None,
) -> float:
    """Seconds from sending one request to having read its whole answer (which must be 200)."""
    data, headers = None, _auth(token)
    if form is not None:
        boundary = uuid.uuid4().hex
        data = (
            "".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in form.items()
            ).encode()
            + f"--{boundary}--\r\n".encode()
        )
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif json_body is not None:
        data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {url} answered {response.status}")
    return time.perf_counter() - start


def _infer(url: str, image: str, timeout: float, token: str | None = None) -> float:
    """Seconds for one automatic pre-label of ``image`` (``surgicalsam``, PNG label map)."""
    params = json.dumps({"result_extension": ".png", "result_dtype": "uint8"})
    return _timed(
        f"{url}/infer/surgicalsam?image={image}&output=image",
        "POST",
        form={"params": params},
        timeout=timeout,
        token=token,
    )


def endpoint_requests(url: str, image: str) -> dict:
    """The read-only requests timed by :func:`measure_endpoints`: name -> keyword arguments of ``_timed``."""
    png = {"result_extension": ".png", "result_dtype": "uint8"}
    infer = f"{url}/infer/{{}}?image={image}&output=image"
    return {
        "GET /info/": {"url": f"{url}/info/"},
        "GET /datastore/?output=all": {"url": f"{url}/datastore/?output=all"},
        "GET /datastore/image": {"url": f"{url}/datastore/image?image={image}"},
        "GET /review/": {"url": f"{url}/review/"},
        "POST /infer/surgicalsam": {
            "url": infer.format("surgicalsam"),
            "method": "POST",
            "form": {"params": json.dumps(png)},
        },
        "POST /infer/surgicalsam_class": {
            "url": infer.format("surgicalsam_class"),
            "method": "POST",
            "form": {"params": json.dumps({**png, "class_id": 2})},
        },
        "POST /infer/sam_prompt (one click)": {
            "url": infer.format("sam_prompt"),
            "method": "POST",
            "form": {"params": json.dumps({**png, "foreground": [[10, 10]]})},
        },
        "POST /infer/sam_prompt (box)": {
            "url": infer.format("sam_prompt"),
            "method": "POST",
            "form": {"params": json.dumps({**png, "box": [0, 0, 20, 20]})},
        },
        # scoring before active learning: each next_sample starts MONAI Label's scoring in the background, and
        # a scoring request answers 429 while one runs
        "POST /scoring/surgicalsam_uncertainty (run_sync)": {
            "url": f"{url}/scoring/surgicalsam_uncertainty?run_sync=true",
            "method": "POST",
            "json_body": {},
        },
        "POST /activelearning/most_uncertain": {
            "url": f"{url}/activelearning/most_uncertain",
            "method": "POST",
            "json_body": {},
        },
    }


def measure_endpoints(url: str, image: str, repeats: int = 3, timeout: float = 120.0, token: str | None = None) -> dict:
    """Median and max seconds of ``repeats`` calls of each read-only endpoint, one after another."""
    figures = {}
    for name, request in endpoint_requests(url, image).items():
        figures[name] = _summary([_timed(timeout=timeout, token=token, **request) for _ in range(repeats)])
    return figures


def _info(url: str, timeout: float, token: str | None = None) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(
        urllib.request.Request(f"{url}/info/", headers=_auth(token)), timeout=timeout
    ) as response:
        response.read()
    return time.perf_counter() - start


def _summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "median_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3)}


def measure(
    url: str, image: str, requests: int = 8, clients: int = 4, timeout: float = 120.0, token: str | None = None
) -> dict:
    _infer(url, image, timeout, token)  # warm-up: loads the network
    start = time.perf_counter()
    sequential = [_infer(url, image, timeout, token) for _ in range(requests)]
    sequential_wall = time.perf_counter() - start

    info, done = [], threading.Event()

    def poll_info():
        while not done.is_set():
            info.append(_info(url, timeout, token))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_info)
    start = time.perf_counter()
    poller.start()
    with ThreadPoolExecutor(clients) as pool:
        parallel = list(pool.map(lambda _: _infer(url, image, timeout, token), range(requests)))
    parallel_wall = time.perf_counter() - start
    done.set()
    poller.join(timeout)
    return {
        "sequential": {**_summary(sequential), "wall_s": round(sequential_wall, 2)},
        f"{clients}_way": {**_summary(parallel), "wall_s": round(parallel_wall, 2)},
        "info_during_inference": _summary(info) if info else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, help="an image id in the server's datastore")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="calls of each endpoint (0: skip the endpoint figures)")
    parser.add_argument(
        "--token",
        default=os.environ.get("SURGICALSAM_TOKEN"),
        help="the server's access token (default: $SURGICALSAM_TOKEN)",
    )
    args = parser.parse_args(argv)
    figures = measure(args.url, args.image, args.requests, args.clients, token=args.token)
    if args.repeats:
        figures["endpoints"] = measure_endpoints(args.url, args.image, args.repeats, token=args.token)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
