"""A bounded load measurement of a running SurgicalSAM MONAI Label server (test side; loopback by default).

Sends N automatic inferences one after another, then N from 4 clients at once, and while the 4-way run
goes, polls GET /info/ to see whether the server still answers it. Prints latency figures (median and max
per request, wall time, /info/ latency during inference) as one JSON object.

    python tools/monailabel_load.py --url http://127.0.0.1:8000 --image seq1_00000 --requests 8

Bounded: every request has a timeout, the counts are fixed, nothing retries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor


def _infer(url: str, image: str, timeout: float) -> float:
    boundary = uuid.uuid4().hex
    params = json.dumps({"result_extension": ".png", "result_dtype": "uint8"})
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{params}\r\n'
            f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(f"{url}/infer/surgicalsam?image={image}&output=image", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"inference answered {response.status}")
    return time.perf_counter() - start


def _info(url: str, timeout: float) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"{url}/info/", timeout=timeout) as response:
        response.read()
    return time.perf_counter() - start


def _summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "median_s": round(statistics.median(latencies), 3), "max_s": round(max(latencies), 3)}


def measure(url: str, image: str, requests: int = 8, clients: int = 4, timeout: float = 120.0) -> dict:
    _infer(url, image, timeout)  # warm-up: loads the network
    start = time.perf_counter()
    sequential = [_infer(url, image, timeout) for _ in range(requests)]
    sequential_wall = time.perf_counter() - start

    info, done = [], threading.Event()

    def poll_info():
        while not done.is_set():
            info.append(_info(url, timeout))
            time.sleep(0.05)

    poller = threading.Thread(target=poll_info)
    start = time.perf_counter()
    poller.start()
    with ThreadPoolExecutor(clients) as pool:
        parallel = list(pool.map(lambda _: _infer(url, image, timeout), range(requests)))
    parallel_wall = time.perf_counter() - start
    done.set()
    poller.join(timeout)
    return {"sequential": {**_summary(sequential), "wall_s": round(sequential_wall, 2)},
            f"{clients}_way": {**_summary(parallel), "wall_s": round(parallel_wall, 2)},
            "info_during_inference": _summary(info) if info else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, help="an image id in the server's datastore")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.url, args.image, args.requests, args.clients), indent=2))


if __name__ == "__main__":
    main()
