"""Frames handed out for labelling are reserved for the client that got them, so two annotators asking for
the next frame at once get different frames.

``POST /activelearning/<strategy>`` (MONAI Label's next sample) runs the strategy on a view of the datastore
(:class:`ReservedView`) whose unlabelled frames leave out those reserved by other clients; the frame served
is then reserved for the asking client (its ``client_id``, which MONAI Label's client and 3D Slicer send;
a request without one gets a reservation of its own) for ``reserve_s`` seconds (``--conf reserve_s``,
default 1800), replacing that client's earlier reservation. A frame is free again once labelled (it is no
longer unlabelled), when its reservation expires, or when its client asks for another one.
"""

from __future__ import annotations

import threading
import time
import uuid

DEFAULT_RESERVE_S = 1800.0


def reserve_seconds(conf: dict) -> float:
    value = conf.get("reserve_s", DEFAULT_RESERVE_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"--conf reserve_s must be a number of seconds >= 0, got {value!r}")
    return seconds


class Reservations:
    """image id -> (client id, expiry on ``clock``); thread-safe; ``lock`` also serialises whole
    next-sample requests (choose, then reserve)."""

    def __init__(self, seconds: float, clock=time.monotonic) -> None:
        self.seconds = float(seconds)
        self.clock = clock
        self.lock = threading.RLock()
        self._held: dict[str, tuple[str, float]] = {}

    def held_by_others(self, client_id: str) -> set[str]:
        now = self.clock()
        with self.lock:
            self._held = {k: v for k, v in self._held.items() if v[1] > now}
            return {image_id for image_id, (holder, _) in self._held.items() if holder != client_id}

    def reserve(self, image_id: str, client_id: str) -> float:
        """Reserve ``image_id`` for ``client_id`` (its earlier reservation is released); returns the seconds held."""
        with self.lock:
            self._held = {k: v for k, v in self._held.items() if v[0] != client_id}
            if self.seconds > 0:
                self._held[image_id] = (client_id, self.clock() + self.seconds)
        return self.seconds


def client_of(request: dict) -> str:
    """The asking client's id (``client_id`` of the request), or a new one when it sent none."""
    client_id = request.get("client_id")
    return str(client_id) if client_id not in (None, "") else f"anonymous-{uuid.uuid4().hex}"


class ReservedView:
    """The datastore as a strategy sees it: unlabelled frames reserved by other clients left out."""

    def __init__(self, datastore, hidden: set[str]) -> None:
        self._datastore = datastore
        self._hidden = hidden

    def get_unlabeled_images(self, *args, **kwargs):
        return [i for i in self._datastore.get_unlabeled_images(*args, **kwargs) if i not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._datastore, name)
