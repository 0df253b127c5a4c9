"""Real MONAI Label 0.8.5 servers on 127.0.0.1 with a tiny model: the stock monaibundle app serving the
bundle, and the bundle's own app (class prompt, SAM clicks/box, automatic).

MONAI Label lives in its own environment (tools/setup_monailabel.sh; its torch is the registry's build, the
one its torchvision loads with). Its python is $MONAILABEL_PYTHON, else .venv-monailabel/bin/python at the
repository root. Without it these tests FAIL, saying how to make it; they are skipped only when
MONAILABEL_ABSENT=1 says MONAI Label is deliberately not installed (CI never sets it).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME = (64, 80)
TINY = {"sam_variant": "tiny", "frame_size": list(FRAME)}
PNG = {"result_extension": ".png", "result_dtype": "uint8", "device": "cpu"}
START_TIMEOUT_S, REQUEST_TIMEOUT_S, TRAIN_TIMEOUT_S = 180, 120, 300

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_root_logging")]


# ------------------------------------------------------------------------------------------------ HTTP
def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in files.items():
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        body.write(content + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


#: server URL -> its access token (the bundle's app asks for one on every request; the stock app does not)
TOKENS: dict[str, str] = {}
SERVER_TOKEN = object()


def request(
    url: str,
    method: str = "GET",
    fields: dict | None = None,
    files: dict | None = None,
    json_body: dict | None = None,
    token=SERVER_TOKEN,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """(status, body); HTTP errors are returned, not raised. Bounded by REQUEST_TIMEOUT_S. Sends
    ``Authorization: Bearer <token>``: by default the token of the server ``url`` belongs to (``TOKENS``);
    ``token`` None sends none, a string sends that one."""
    data, headers = None, dict(headers or {})
    if token is SERVER_TOKEN:
        token = next((t for base, t in TOKENS.items() if url == base or url.startswith(base + "/")), None)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if fields is not None or files is not None:
        data, content_type = _multipart(fields or {}, files or {})
        headers["Content-Type"] = content_type
    elif json_body is not None:
        data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Server:
    """A MONAI Label server on a free port; ``token_file``: where the app keeps its access token (read once the
    server made it, and sent with every ``request`` to this server; default: the bundle's app's place for it,
    ``<studies>/.surgicalsam_token``, which the stock app never makes)."""

    def __init__(
        self,
        python: str,
        app: str,
        studies: str,
        conf: dict,
        log: str,
        token_file: str | None = None,
        env: dict | None = None,
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url, self.log, self.studies = f"http://127.0.0.1:{self.port}", log, studies
        token_file = token_file or os.path.join(studies, ".surgicalsam_token")
        command = [
            python,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            app,
            "--studies",
            studies,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for key, value in conf.items():
            command += ["--conf", key, value]
        env = {
            k: v
            for k, v in {**os.environ, **(env or {})}.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV") and (k != "SURGICALSAM_TOKEN" or k in (env or {}))
        }
        env.update(OMP_NUM_THREADS="1", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
        if env.get("SURGICALSAM_TOKEN"):
            TOKENS[self.url] = env["SURGICALSAM_TOKEN"]
        self.process = subprocess.Popen(
            command,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=os.path.dirname(app),
            start_new_session=True,
        )
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"MONAI Label server exited ({self.process.returncode}):\n{self.log_tail()}")
            if token_file and self.url not in TOKENS and os.path.isfile(token_file):
                with open(token_file) as handle:
                    token = handle.read().strip()
                if token:
                    TOKENS[self.url] = token
            try:
                if request(self.url + "/info/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"MONAI Label server did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log, errors="replace") as handle:
            return handle.read()[-chars:]

    def stop(self) -> None:
        TOKENS.pop(self.url, None)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its training subprocesses
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)

    def alive(self) -> bool:
        return request(self.url + "/info/")[0] == 200

    def infer(
        self, model: str, image: str | None = "seq1_00000", params: dict | None = None, file: bytes | None = None
    ):
        query = "output=image" + (f"&image={image}" if image else "")
        files = {"file": ("frame.png", file)} if file is not None else None
        return request(
            f"{self.url}/infer/{model}?{query}",
            "POST",
            fields={"params": json.dumps({**PNG, **(params or {})})},
            files=files,
        )

    def put_image(self, image: str, content: bytes):
        return request(f"{self.url}/datastore/image?image={image}", "PUT", files={"file": ("frame.png", content)})

    def put_label(self, image: str, content: bytes):
        return request(
            f"{self.url}/datastore/label?image={image}&tag=final", "PUT", files={"label": ("label.png", content)}
        )

    def train(self, model: str = "surgicalsam", **params) -> dict:
        status, body = request(
            f"{self.url}/train/{model}",
            "POST",
            json_body={"max_epochs": 1, "device": "cpu", "val_split": 0.0, **params},
        )
        assert status == 200, body
        deadline = time.time() + TRAIN_TIMEOUT_S
        while time.time() < deadline:
            status, body = request(f"{self.url}/train/?check_if_running=false")
            task = json.loads(body)
            if task.get("status") in ("DONE", "ERROR"):
                return task
            time.sleep(2)
        pytest.fail(f"training did not finish within {TRAIN_TIMEOUT_S} s:\n{self.log_tail()}")


def wait_for_no_task(server: Server, method: str) -> None:
    deadline = time.time() + TRAIN_TIMEOUT_S
    while request(f"{server.url}/{method}/?check_if_running=true")[0] == 200:
        if time.time() > deadline:
            pytest.fail(f"a {method} task still runs after {TRAIN_TIMEOUT_S} s")
        time.sleep(1)


def server_studies(server: Server) -> str:
    return json.loads(request(server.url + "/info/")[1])["datastore"].get("studies") or server.studies


def png_array(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- fixtures
def _studies(setup, name):
    studies = setup["root"] / name
    studies.mkdir()
    for image_id, (image, _) in setup["frames"].items():
        shutil.copyfile(image, studies / f"{image_id}.png")
    # one JPG frame: results must still come back as PNG label maps
    Image.open(setup["frames"]["seq1_00000"][0]).save(studies / "jpgframe.jpg", quality=95)
    return str(studies)


def _network(setup, model_file):
    from scripts.monailabel_glue.bundle_folder import load_model_state
    from scripts.surgical_sam.network import SurgicalSAM

    network = SurgicalSAM(7, 2, FRAME, "tiny", setup["sam"], with_image_encoder=True).eval()
    network.load_state_dict(load_model_state(model_file))
    return network


def _frame_tensor(path):
    from scripts.data.frame_files import read_frame

    return torch.from_numpy(read_frame(path)).permute(2, 0, 1)[None].float()


def _expected_auto(setup, model_file, image_id, class_id=None, min_mask_fraction=0.01, as_cached=False):
    """The bundle's own label map for a frame (the same network and model file, in this process); with
    ``as_cached`` from the frame's embedding in the cache's encoding, as the app's training caches and validates it."""
    from scripts.data.frame_files import read_frame
    from scripts.embedding_cache import DEFAULT_EMBEDDING_ENCODING, decode_embedding, encode_embedding
    from scripts.monailabel_glue.bundle_folder import load_model_state
    from scripts.surgical_sam.inferer import ClassPromptInferer
    from scripts.surgical_sam.network import SurgicalSAM

    network = SurgicalSAM(7, 2, FRAME, "tiny", setup["sam"], with_image_encoder=True).eval()
    network.load_state_dict(load_model_state(model_file))
    frame = torch.from_numpy(read_frame(setup["frames"][image_id][0])).permute(2, 0, 1)[None].float()
    if class_id is None:
        inferer = ClassPromptInferer(7, "auto", min_mask_fraction, output="label_map")
    else:
        inferer = ClassPromptInferer(7, "auto", 0.0, output="label_map", prompt_classes=[class_id])
    with torch.no_grad():
        if as_cached:
            embedding = network.embed_frames(frame)[0].numpy()
            stored = encode_embedding(embedding, DEFAULT_EMBEDDING_ENCODING)
            frame = torch.from_numpy(decode_embedding(stored))[None]
        return inferer(frame, network)[0, 0].numpy().astype(np.uint8)


def _stock_app(setup, name: str) -> tuple[str, str]:
    """A copy (``setup["root"]/name``) of the monaibundle sample app shipped in the monailabel package, with
    the bundle in its ``model/surgicalsam`` folder: (app folder, bundle folder)."""
    from scripts.monailabel_glue.bundle_folder import make_monailabel_bundle

    sample = subprocess.run(
        [
            setup["python"],
            "-c",
            "import os, sys; print(os.path.join(sys.prefix, 'monailabel', 'sample-apps', 'monaibundle'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert os.path.isfile(os.path.join(sample, "main.py")), f"no monaibundle sample app at {sample}"
    app = str(setup["root"] / name)
    shutil.copytree(sample, app)
    bundle = make_monailabel_bundle(
        os.path.join(app, "model", "surgicalsam"), model_file=setup["model"], sam_checkpoint=setup["sam"], settings=TINY
    )
    return app, bundle


STOCK_CONF = {"zoo_source": "github", "sam2": "false"}


@pytest.fixture(scope="module")
def stock(setup):
    """The monaibundle sample app serving the bundle."""
    app, bundle = _stock_app(setup, "stock_app")
    server = Server(
        setup["python"],
        app,
        _studies(setup, "stock_studies"),
        {"models": "surgicalsam", **STOCK_CONF},
        str(setup["root"] / "stock.log"),
    )
    yield server, bundle
    server.stop()


#: A second, unrelated bundle with its own ``scripts`` package (a 1x1 convolution over the colours).
SECOND_BUNDLE = os.path.join(REPO, "tests", "second_bundle")


def second_bundle_weights(frame_file: str) -> dict:
    """The second bundle's model.pt: class 1 ("bright") where a pixel's mean colour is above the median of
    ``frame_file``'s, so that frame's map is about half of each class."""
    frame = np.asarray(Image.open(frame_file).convert("RGB"), dtype=np.float32) / 255
    weight = torch.zeros(2, 3, 1, 1)
    weight[1] = 1 / 3
    return {"conv.weight": weight, "conv.bias": torch.tensor([0.0, -float(np.median(frame.mean(axis=2)))])}


def second_bundle_label_map(frame_file: str, state: dict) -> np.ndarray:
    """(H, W) uint8: the second bundle's classes of a frame, computed here with torch alone."""
    frame = torch.from_numpy(np.asarray(Image.open(frame_file).convert("RGB"), dtype=np.float32))
    logits = F.conv2d(frame.permute(2, 0, 1)[None] / 255, state["conv.weight"], state["conv.bias"])
    return logits[0].argmax(0).numpy().astype(np.uint8)


@pytest.fixture
def two_bundles(setup):
    """One monaibundle sample app serving two bundles that both have a top-level ``scripts`` package: this one
    and tests/second_bundle. Its one test's own server (stopped after it, not at the end of the module)."""
    app, bundle = _stock_app(setup, "two_bundle_app")
    second = os.path.join(app, "model", "brightpixels")
    shutil.copytree(SECOND_BUNDLE, second, ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.join(second, "models"))
    state = second_bundle_weights(setup["frames"]["seq1_00000"][0])
    torch.save(state, os.path.join(second, "models", "model.pt"))
    server = Server(
        setup["python"],
        app,
        _studies(setup, "two_bundle_studies"),
        {"models": "surgicalsam,brightpixels", **STOCK_CONF},
        str(setup["root"] / "two_bundles.log"),
    )
    yield server, bundle, state
    server.stop()


def _ambiguous_frame(setup, studies):
    """A (frame, presence threshold) pair that puts one class of that frame exactly on the automatic
    protocol's presence threshold (its mask has exactly min_pixels pixels) while no other frame has a class
    mask of that size: the deliberately ambiguous frame of the served model."""
    from scripts.surgical_sam.inferer import ClassPromptInferer

    network, inferer = _network(setup, setup["model"]), ClassPromptInferer(7, "auto", 0.0)
    counts = {}
    for path in sorted(glob.glob(os.path.join(studies, "*.*"))):
        with torch.no_grad():
            counts[os.path.splitext(os.path.basename(path))[0]] = inferer.uncertainty(_frame_tensor(path), network)[
                "pixels"
            ][0].tolist()
    every = [c for frame in counts.values() for c in frame]
    area = FRAME[0] * FRAME[1]
    for image_id in sorted(counts):
        if not image_id.startswith("seq"):
            continue
        for count in counts[image_id]:
            if area // 100 <= count <= area // 4 and every.count(count) == 1:
                return image_id, (count - 0.5) / area
    pytest.fail(f"no frame has a class mask of a size no other frame has: {counts}")


@pytest.fixture(scope="module")
def own(setup):
    """The bundle's own app (monailabel_app/), its bundle folder made by make_monailabel_bundle; its presence
    threshold puts one frame exactly on the threshold (setup["ambiguous"]), and one frame file is corrupt."""
    from scripts.monailabel_glue.bundle_folder import make_monailabel_bundle

    app = str(setup["root"] / "own_app")
    shutil.copytree(os.path.join(REPO, "monailabel_app"), app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    studies = _studies(setup, "own_studies")
    setup["ambiguous"], setup["own_min_mask_fraction"] = _ambiguous_frame(setup, studies)
    bundle = make_monailabel_bundle(
        os.path.join(app, "model", "surgicalsam"),
        model_file=setup["model"],
        sam_checkpoint=setup["sam"],
        settings={**TINY, "min_mask_fraction": setup["own_min_mask_fraction"]},
    )
    with open(os.path.join(studies, "broken.png"), "wb") as handle:  # on disk, not through the datastore's PUT
        handle.write(b"\x89PNG\r\n\x1a\n this is not a frame")
    server = Server(setup["python"], app, studies, {"threads": "1"}, str(setup["root"] / "own.log"))
    yield server, bundle
    server.stop()


# ------------------------------------------------------------------------------------------- stock app
def test_stock_info_lists_instrument_labels(stock):
    server, _ = stock
    info = json.loads(request(server.url + "/info/")[1])
    model = info["models"]["surgicalsam"]
    assert model["labels"] == {
        "bipolar forceps": 1,
        "prograsp forceps": 2,
        "large needle driver": 3,
        "monopolar curved scissors": 4,
        "ultrasound probe": 5,
        "suction instrument": 6,
        "clip applier": 7,
    }
    assert model["dimension"] == 2
    assert "surgicalsam" in info["trainers"]


def test_stock_infer_returns_the_bundles_label_map(stock, setup):
    server, bundle = stock
    status, body = server.infer("surgicalsam")
    assert status == 200, body[:500]
    mask = png_array(body)
    assert mask.shape == FRAME and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, _expected_auto(setup, os.path.join(bundle, "models", "model.pt"), "seq1_00000"))


def test_stock_app_serves_two_bundles_each_with_its_own_scripts(two_bundles, setup):
    """MONAI Label's monaibundle app loads both bundles into one server; each /infer, in turns, runs its own
    bundle's ``scripts`` and network, never the other's (MONAI Label puts a bundle's folder first on sys.path
    and unloads ``scripts`` before each step of that bundle; the install adds no ``scripts`` of its own)."""
    server, bundle, state = two_bundles
    models = json.loads(request(server.url + "/info/")[1])["models"]
    assert models["brightpixels"]["labels"] == {"bright": 1} and models["brightpixels"]["dimension"] == 2
    assert len(models["surgicalsam"]["labels"]) == 7
    frame_file = setup["frames"]["seq1_00000"][0]
    expected = {
        "surgicalsam": _expected_auto(setup, os.path.join(bundle, "models", "model.pt"), "seq1_00000"),
        "brightpixels": second_bundle_label_map(frame_file, state),
    }
    assert not np.array_equal(expected["surgicalsam"], expected["brightpixels"])
    assert 0.2 < expected["brightpixels"].mean() < 0.8
    for model in ("surgicalsam", "brightpixels", "surgicalsam", "brightpixels"):
        status, body = server.infer(model)
        assert status == 200, (model, body[:500], server.log_tail())
        np.testing.assert_array_equal(png_array(body), expected[model], err_msg=model)


def test_stock_jpg_frame_gives_a_png_label_map(stock):
    """No result_extension in the request: the bundle's displayable_configs make it PNG, not the frame's JPG."""
    server, _ = stock
    status, body = request(
        f"{server.url}/infer/surgicalsam?image=jpgframe&output=image",
        "POST",
        fields={"params": json.dumps({"device": "cpu"})},
    )
    assert status == 200, body[:300]
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    mask = png_array(body)
    assert mask.shape == FRAME and mask.dtype == np.uint8


def test_stock_wrong_checkpoint_key_fails_instead_of_random_weights(stock):
    """MONAI Label loads with strict=False; a model.pt under another key must not serve random weights."""
    server, bundle = stock
    model_file = os.path.join(bundle, "models", "model.pt")
    good = open(model_file, "rb").read()
    state = torch.load(model_file, weights_only=True)
    try:
        torch.save({"state_dict": state}, model_file)  # MONAI Label reloads when the file's mtime changes
        status, body = server.infer("surgicalsam")
        assert status >= 500, "a model.pt under another key was served"
        deadline = time.time() + 10  # the traceback reaches the log file a little later
        while "does not fit" not in server.log_tail(40000) and time.time() < deadline:
            time.sleep(0.5)
        assert "does not fit" in server.log_tail(40000)
    finally:
        with open(model_file, "wb") as handle:
            handle.write(good)
    assert server.infer("surgicalsam")[0] == 200


def test_stock_malformed_requests_fail_and_the_server_keeps_serving(stock):
    server, _ = stock
    # MONAI Label's stock app answers these with a bare 500 (its endpoints map no exception to 4xx)
    assert server.infer("nosuch")[0] >= 400
    assert server.infer("surgicalsam", image="nosuch")[0] >= 400
    assert server.infer("surgicalsam", image=None, file=b"not a png")[0] >= 400
    # These two are answered by MONAI Label's /infer endpoint itself (monailabel/endpoints/infer.py
    # run_inference) before any app or bundle code runs, so only the bundle's own app turns them into 400
    # (test_own_malformed_requests_get_4xx_with_a_message); the app README says so.
    status, body = request(
        f"{server.url}/infer/surgicalsam?image=seq1_00000&output=image", "POST", fields={"params": "{not json"}
    )
    assert status == 500 and body == b"Internal Server Error", (status, body[:300])  # json.loads(params), unguarded
    status, body = request(f"{server.url}/infer/surgicalsam?output=image", "POST", fields={"params": "{}"})
    assert status == 500 and b"Neither Image nor File" in body, (status, body[:300])  # its own HTTPException(500)
    # a corrupt frame PUT to the stock datastore is stored and listed (LocalDatastore.add_image copies the file)
    assert server.put_image("corruptframe", b"not a png")[0] == 200
    assert "corruptframe" in json.loads(request(f"{server.url}/datastore/?output=all")[1])["objects"]
    assert request(f"{server.url}/datastore/image?id=corruptframe", "DELETE")[0] == 200
    assert server.alive()
    assert server.infer("surgicalsam")[0] == 200


def label_then_train(server, bundle, setup, image_ids, **train_params) -> str:
    """Save the GT label of each frame through /datastore, run /train, and check that it changed
    models/model.pt (same keys, other values). Returns that file's path."""
    for image_id in image_ids:
        status, body = server.put_label(image_id, open(setup["frames"][image_id][1], "rb").read())
        assert status == 200, body
    model_file = os.path.join(bundle, "models", "model.pt")
    before = torch.load(model_file, weights_only=True)
    task = server.train(**train_params)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    after = torch.load(model_file, weights_only=True)
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    return model_file


def test_stock_label_then_train_guards_the_served_model(stock, setup):
    """The stock app runs the bundle's fine-tuning overlay with its defaults: the served model is scored on
    the validation frames first and replaced only by a better checkpoint; the status log says which."""
    server, bundle = stock
    image_ids = ("seq1_00000", "seq1_00001", "seq1_00002", "seq3_00000")
    for image_id in image_ids:
        assert server.put_label(image_id, open(setup["frames"][image_id][1], "rb").read())[0] == 200
    model_file = os.path.join(bundle, "models", "model.pt")
    before = torch.load(model_file, weights_only=True)
    task = server.train(max_epochs=2, val_split=0.5)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    said = [line for line in task["details"] if "served model REPLACED" in line or "served model KEPT" in line]
    assert said, "\n".join(task["details"])
    after = torch.load(model_file, weights_only=True)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert unchanged == ("served model KEPT" in said[-1]), said
    status, body = server.infer("surgicalsam")
    assert status == 200
    np.testing.assert_array_equal(png_array(body), _expected_auto(setup, model_file, "seq1_00000"))


def test_stock_label_of_another_size_the_train_status_says_why(stock, setup):
    """MONAI Label's stock datastore stores a label map of another size (its PUT runs no bundle code:
    LocalDatastore.save_label copies the file); training then ends in ERROR, and the train status's last line
    is the bundle's reason (frame, both sizes, what to do), not MONAI's "Failed to instantiate" wrapper."""
    server, bundle = stock
    image_id = "seq2_00000"
    model_file = os.path.join(bundle, "models", "model.pt")
    before = open(model_file, "rb").read()
    status, body = server.put_label(image_id, png_bytes(np.zeros((10, 12), np.uint8)))
    assert status == 200, body  # the stock app's limit: the bundle's own app answers 400 here
    try:
        task = server.train(val_split=0.0)
        details = task.get("details", [])
        assert task["status"] == "ERROR", details[-5:]
        last = details[-1]
        assert "the label map of frame seq2_00000 is 10x12 (height x width) but the frame is 64x80" in last, details[
            -5:
        ]
        assert "PUT /datastore/label?image=seq2_00000&tag=final" in last, last
        assert not any("Failed to instantiate" in line for line in details), details
        assert open(model_file, "rb").read() == before
    finally:
        status, body = request(f"{server.url}/datastore/label?id={image_id}&tag=final", "DELETE")
        assert status == 200, body


# --------------------------------------------------------------------------------------------- own app
def test_own_info_lists_models_and_labels(own):
    server, _ = own
    info = json.loads(request(server.url + "/info/")[1])
    assert set(info["models"]) == {"surgicalsam", "surgicalsam_class", "surgicalsam_video", "sam_prompt"}
    assert info["models"]["surgicalsam_class"]["labels"]["prograsp forceps"] == 2
    assert "surgicalsam" in info["trainers"]


def test_own_auto_and_class_prompt(own, setup):
    server, bundle = own
    model_file = os.path.join(bundle, "models", "model.pt")
    status, body = server.infer("surgicalsam")
    assert status == 200
    np.testing.assert_array_equal(
        png_array(body),
        _expected_auto(setup, model_file, "seq1_00000", min_mask_fraction=setup["own_min_mask_fraction"]),
    )
    for params, class_id in (({"class_name": "Prograsp Forceps"}, 2), ({"class_id": 5}, 5)):
        status, body = server.infer("surgicalsam_class", params=params)
        assert status == 200, body[:300]
        mask = png_array(body)
        assert set(np.unique(mask)) <= {0, class_id}
        np.testing.assert_array_equal(mask, _expected_auto(setup, model_file, "seq1_00000", class_id))


def test_own_sam_clicks_and_box(own, setup):
    from scripts.data.frame_files import read_frame
    from scripts.sam.prompting import SamPointPrompter
    from scripts.surgical_sam.network import SurgicalSAM

    server, bundle = own
    network = SurgicalSAM(7, 2, FRAME, "tiny", setup["sam"], with_image_encoder=True).eval()
    prompter = SamPointPrompter(network, "tiny", setup["sam"])
    frame = torch.from_numpy(read_frame(setup["frames"]["seq1_00000"][0])).permute(2, 0, 1)[None].float()
    cases = [
        ({"foreground": [[10, 20]], "background": [[70, 50]], "class_id": 3}, 3),
        ({"box": [5, 5, 60, 50]}, 1),
        ({"foreground": [[30, 30]], "box": [0, 0, 79, 63], "class_name": "clip applier"}, 7),
    ]
    for params, value in cases:
        status, body = server.infer("sam_prompt", params=params)
        assert status == 200, body[:300]
        mask = png_array(body)
        assert mask.shape == FRAME and set(np.unique(mask)) <= {0, value}
        prompts = {k: v for k, v in params.items() if k in ("foreground", "background", "box")}
        logits, _ = prompter(frame, **prompts)
        np.testing.assert_array_equal(mask, (logits[0, 0] > 0).numpy().astype(np.uint8) * value)


SAM_PROMPTS = [
    {"foreground": [[10, 20]]},
    {"foreground": [[10, 20], [30, 40]], "background": [[70, 5]]},
    {"box": [5, 6, 50, 60]},
    {"foreground": [[12, 30]], "box": [0, 0, 40, 63]},
]


def _segment_anything_predictor(setup, frame_file, prompts, resize, out_dir):
    """segment-anything's SamPredictor on the same SAM weights (tests/segment_anything_predictor.py, run in
    the MONAI Label environment, which has the torchvision it imports) -> logits (H, W) per prompt."""
    request_file, out_file = (
        os.path.join(out_dir, f"request_{resize}.json"),
        os.path.join(out_dir, f"logits_{resize}.npz"),
    )
    with open(request_file, "w") as handle:
        json.dump(
            {"variant": "tiny", "checkpoint": setup["sam"], "frame": frame_file, "prompts": prompts, "resize": resize},
            handle,
        )
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=os.path.join(REPO, "bundle"), OMP_NUM_THREADS="1")
    subprocess.run(
        [setup["python"], os.path.join(REPO, "tests", "segment_anything_predictor.py"), request_file, out_file],
        check=True,
        env=env,
        timeout=REQUEST_TIMEOUT_S,
    )
    logits = np.load(out_file)
    return [logits[f"logits_{i}"] for i in range(len(prompts))]


def test_own_sam_prompt_agrees_with_segment_anythings_predictor(own, setup, tmp_path, capsys):
    """The served sam_prompt and segment-anything's own SamPredictor, same SAM weights (a tiny SAM built from
    segment-anything's classes: no official weights can be fetched here), same frame, clicks and box. They
    differ only by how the frame is resized to SAM's input: handed the app's resize, the predictor gives the
    app's logits (1e-4) and masks exactly; with its own (uint8, PIL), the masks agree to the printed IoU."""
    from scripts.sam.prompting import SamPointPrompter

    server, bundle = own
    frame_file = setup["frames"]["seq1_00000"][0]
    prompter = SamPointPrompter(_network(setup, os.path.join(bundle, "models", "model.pt")), "tiny", setup["sam"])
    own_resize = _segment_anything_predictor(setup, frame_file, SAM_PROMPTS, "predictor", str(tmp_path))
    app_resize = _segment_anything_predictor(setup, frame_file, SAM_PROMPTS, "app", str(tmp_path))
    figures = []
    for prompts, reference, same_input in zip(SAM_PROMPTS, own_resize, app_resize):
        status, body = server.infer("sam_prompt", params=prompts)
        assert status == 200, body[:300]
        served = png_array(body) > 0
        with torch.no_grad():
            logits = prompter(_frame_tensor(frame_file), **prompts)[0][0, 0].numpy()
        np.testing.assert_array_equal(
            served, logits > 0
        )  # the served mask is these logits' (as test_own_sam_clicks_and_box)
        np.testing.assert_allclose(logits, same_input, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(served, same_input > 0)
        theirs = reference > 0
        figures.append(
            {
                "prompts": prompts,
                "mask_iou": round(float((served & theirs).sum() / (served | theirs).sum()), 4),
                "pixels_differing": int((served ^ theirs).sum()),
                "pixels": int(served.size),
                "max_logit_difference": round(float(np.abs(logits - reference).max()), 4),
                "logit_range": [round(float(reference.min()), 3), round(float(reference.max()), 3)],
            }
        )
    with capsys.disabled():
        print("\nsam_prompt against SamPredictor (its own resize):", json.dumps(figures))
    for figure in figures:
        assert figure["mask_iou"] >= 0.98 and figure["max_logit_difference"] <= 0.01, figure


def test_own_malformed_requests_get_4xx_with_a_message(own, setup):
    server, _ = own
    frame = np.asarray(Image.open(setup["frames"]["seq1_00000"][0]))
    label = open(setup["frames"]["seq1_00000"][1], "rb").read()
    cases = [
        (server.infer("nosuch"), 404, "unknown model"),
        (server.infer("surgicalsam", image="nosuch"), 404, "not in the datastore"),
        (server.infer("sam_prompt", params={"foreground": [[80, 10]]}), 400, "outside the frame"),
        (server.infer("sam_prompt", params={"box": [50, 5, 10, 20]}), 400, "x0 < x1"),
        (server.infer("sam_prompt", params={}), 400, "at least one"),
        (server.infer("surgicalsam_class", params={"class_name": "scalpel"}), 400, "unknown class_name"),
        (server.infer("surgicalsam_class", params={}), 400, "class_name"),
        (server.infer("surgicalsam", image=None, file=b"not a png"), 400, "cannot read frame"),
        (server.put_label("seq1_00001", b"not a png"), 400, "not a readable image"),
        (server.put_label("seq1_00001", png_bytes(frame)), 400, "mode 'RGB'"),
        (server.put_label("seq1_00001", png_bytes(np.zeros((10, 10), np.uint8))), 400, "differs from the frame"),
        (server.put_label("seq1_00001", png_bytes(np.full(FRAME, 9, np.uint8))), 400, "outside 0..7"),
        (server.put_label("nosuch", label), 404, "not in the datastore"),
        (server.put_image("newframe", b"not a png"), 400, "cannot read frame"),
        (
            request(
                f"{server.url}/infer/surgicalsam?image=seq1_00000&output=image", "POST", fields={"params": "{not json"}
            ),
            400,
            "params is not JSON",
        ),
        (
            request(f"{server.url}/infer/surgicalsam?output=image", "POST", fields={"params": "{}"}),
            400,
            "give an image id",
        ),
        (
            request(
                f"{server.url}/datastore/image?image=newframe",
                "PUT",
                fields={"params": "[1"},
                files={"file": ("f.png", png_bytes(frame))},
            ),
            400,
            "params is not JSON",
        ),
        (request(f"{server.url}/train/nosuch", "POST", json_body={}), 404, "this app trains ['surgicalsam']"),
    ]
    for (status, body), expected, message in cases:
        assert status == expected, (expected, message, status, body[:300])
        assert message in json.loads(body)["detail"], body
    assert server.alive()
    status, body = server.infer("surgicalsam", image=None, file=png_bytes(frame))  # an upload that is fine
    assert status == 200 and png_array(body).shape == FRAME
    images = json.loads(request(f"{server.url}/datastore/?output=all")[1])["objects"]
    assert "newframe" not in images, "a refused image was listed"


def test_own_most_uncertain_serves_the_ambiguous_frame_first(own, setup):
    """The frame whose class mask sits exactly on the presence threshold (margin 0) is served first; the
    scoring method scores every unlabelled frame (the corrupt one is reported, not fatal)."""
    server, _ = own
    ambiguous = setup["ambiguous"]
    status, body = request(f"{server.url}/activelearning/most_uncertain", "POST", json_body={"device": "cpu"})
    assert status == 200, body[:300]
    served = json.loads(body)
    assert served["id"] == ambiguous, served
    assert served["surgicalsam_uncertainty"]["presence_margin"] == 0.0
    # label it: the next frame served is another one, with a larger margin
    assert server.put_label(ambiguous, open(setup["frames"][ambiguous][1], "rb").read())[0] == 200
    following = json.loads(
        request(f"{server.url}/activelearning/most_uncertain", "POST", json_body={"device": "cpu"})[1]
    )
    assert following["id"] not in (ambiguous, "broken") and following["surgicalsam_uncertainty"]["presence_margin"] > 0
    wait_for_no_task(server, "scoring")  # next_sample starts MONAI Label's automatic scoring in the background
    status, body = request(
        f"{server.url}/scoring/surgicalsam_uncertainty?run_sync=true", "POST", json_body={"device": "cpu"}
    )
    assert status == 200, body[:300]
    scored = json.loads(body)
    assert set(scored["failed"]) == {"broken"} and "cannot read frame" in scored["failed"]["broken"]
    # every unlabelled readable frame (+ the JPG, - the labelled): scored now, or already by the requests above
    assert scored["scored"] + scored["already_scored"] == len(setup["frames"]) + 1 - 1


def test_own_batch_pre_annotation_on_cpu_reports_each_frame(own, setup):
    """No multi_gpu in the request, no GPU: frames run on the CPU; the corrupt frame is reported, the others saved."""
    server, bundle = own
    status, body = request(
        f"{server.url}/batch/infer/surgicalsam?images=all&run_sync=true",
        "POST",
        json_body={"max_batch_size": 3, "label_tag": "original"},
    )
    assert status == 200, body[:500]
    report = json.loads(body)
    assert list(report["images"]) == ["broken", "jpgframe", "seq1_00000"]
    assert (
        report["images"]["broken"]["status"] == "error" and "cannot read frame" in report["images"]["broken"]["reason"]
    )
    assert report["failed"] == ["broken"] and report["ok"] == 2
    saved = glob.glob(os.path.join(server_studies(server), "labels", "original", "seq1_00000.*"))
    assert saved, "the pre-label was not saved"
    np.testing.assert_array_equal(
        np.asarray(Image.open(saved[0])),
        _expected_auto(
            setup,
            os.path.join(bundle, "models", "model.pt"),
            "seq1_00000",
            min_mask_fraction=setup["own_min_mask_fraction"],
        ),
    )


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def test_own_review_page_in_a_browser(own, setup, tmp_path):
    """The review page in a real headless Chromium (Debian's, driven by Playwright): list the frames, open
    one (its automatic pre-label is the label drawn), pick a class, drag a box, add SAM's mask, save; the
    datastore holds exactly that label map, and a screenshot shows the change inside the box only."""
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    from scripts.sam.prompting import SamPointPrompter

    server, bundle = own
    image_id, class_id, box = "seq2_00003", 3, [5, 5, 60, 50]
    model_file = os.path.join(bundle, "models", "model.pt")
    auto = _expected_auto(setup, model_file, image_id, min_mask_fraction=setup["own_min_mask_fraction"])
    prompter = SamPointPrompter(_network(setup, model_file), "tiny", setup["sam"])
    with torch.no_grad():
        sam = (prompter(_frame_tensor(setup["frames"][image_id][0]), box=box)[0][0, 0] > 0).numpy()
    expected = np.where(sam, class_id, auto).astype(np.uint8)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors, asked = [], []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # the page asks for the server's access token once, keeps it for the tab, sends it as a bearer token
            page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(TOKENS[server.url])))
            page.goto(server.url + "/review/", timeout=60_000)
            page.wait_for_function("document.getElementById('status').textContent.endsWith('frames')", timeout=60_000)
            listed = page.eval_on_selector_all("#frames li", "items => items.map(i => i.dataset.id)")
            assert image_id in listed and "seq1_00000" in listed
            page.click(f"#frames li[data-id='{image_id}']")
            page.wait_for_function(
                f"document.getElementById('status').textContent === '{image_id}: automatic pre-label'", timeout=60_000
            )
            shown = np.array(page.evaluate("Array.from(state.label)"), np.uint8).reshape(FRAME)
            np.testing.assert_array_equal(shown, auto)
            canvas = page.locator("#overlay").bounding_box()
            scale = canvas["width"] / FRAME[1]
            clip = {
                "x": round(canvas["x"]),
                "y": round(canvas["y"]),
                "width": round(FRAME[1] * scale),
                "height": round(FRAME[0] * scale),
            }
            before = page.screenshot(path=str(tmp_path / "before.png"), clip=clip)
            page.select_option("#class", str(class_id))

            def at(x, y):
                return canvas["x"] + (x + 0.5) * scale, canvas["y"] + (y + 0.5) * scale

            page.mouse.move(*at(box[0], box[1]))
            page.mouse.down()
            page.mouse.move(*at(box[2], box[3]), steps=5)
            page.mouse.up()
            assert page.text_content("#prompts") == f"clicks: box {', '.join(map(str, box))}"
            page.click("#sam")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('SAM mask added')", timeout=60_000
            )
            np.testing.assert_array_equal(
                np.array(page.evaluate("Array.from(state.label)"), np.uint8).reshape(FRAME), expected
            )
            after = page.screenshot(path=str(tmp_path / "after.png"), clip=clip)
            page.screenshot(path=str(tmp_path / "page.png"))
            page.click("#save")
            page.wait_for_function(
                f"document.getElementById('status').textContent === '{image_id}: saved'", timeout=60_000
            )
            assert not errors, errors
            assert len(asked) == 1 and "Access token" in asked[0], asked
        finally:
            browser.close()
    status, body = request(f"{server.url}/datastore/label?label={image_id}&tag=final")
    assert status == 200
    np.testing.assert_array_equal(png_array(body), expected)
    # the screenshots differ exactly where the label map changed (each frame pixel is scale x scale on screen)
    shot_before, shot_after = (
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(int) for b in (before, after)
    )
    assert shot_before.shape == shot_after.shape and shot_before.shape[:2] == (
        round(FRAME[0] * scale),
        round(FRAME[1] * scale),
    )
    on_screen = np.abs(shot_before - shot_after).sum(-1) > 30
    in_label = np.kron(expected != auto, np.ones((int(scale), int(scale)), bool))
    assert in_label.any(), "SAM's mask changed nothing: the check would prove nothing"
    assert (on_screen == in_label).mean() > 0.98, (on_screen.sum(), in_label.sum())


def test_own_info_answers_while_inferences_run(own, setup, capsys):
    """tools/monailabel_load.py, bounded (4 requests sequential, then 4 clients): inference runs off the
    server's event loop, so /info/ keeps answering during the 4-way run (more answers than inferences; with
    inference on the event loop each /info/ waits for an inference to end). Prints the figures."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("monailabel_load", os.path.join(REPO, "tools", "monailabel_load.py"))
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    server, _ = own
    figures = load.measure(
        server.url, "seq1_00000", requests=4, clients=4, timeout=REQUEST_TIMEOUT_S, token=TOKENS[server.url]
    )
    wait_for_no_task(server, "scoring")  # an earlier next_sample's background scoring would hold the scoring slot
    figures["endpoints"] = load.measure_endpoints(
        server.url, "seq1_00000", repeats=3, timeout=REQUEST_TIMEOUT_S, token=TOKENS[server.url]
    )
    wait_for_no_task(server, "scoring")  # the background scoring the last next_sample started
    with capsys.disabled():
        print("\nload figures:", json.dumps(figures))
    assert figures["sequential"]["n"] == 4 and figures["4_way"]["n"] == 4
    assert figures["info_during_inference"]["n"] > 4, figures
    assert set(figures["endpoints"]) == set(load.endpoint_requests(server.url, "seq1_00000"))  # each answered 200


def _train_result(task: dict) -> dict:
    """The train task's result: the JSON MONAI Label logs last in the status details ("... Result: {...}")."""
    for line in reversed(task.get("details", [])):
        if "{" in line and '"served_model"' in line:
            return json.loads(line[line.index("{") :])
    pytest.fail("no result line in the train status:\n" + "\n".join(task.get("details", [])))


def _auto_iou(setup, model_file, image_ids, min_mask_fraction, studies, as_cached=False):
    """Challenge IoU (percent) of ``model_file`` on frames against their labels in the datastore."""
    from scripts.evaluation.metrics import EndoVisMetric

    metric = EndoVisMetric(7)
    for image_id in image_ids:
        pred = _expected_auto(setup, model_file, image_id, min_mask_fraction=min_mask_fraction, as_cached=as_cached)
        gt = np.asarray(Image.open(glob.glob(os.path.join(studies, "labels", "final", image_id + ".*"))[0]))
        metric.update((torch.from_numpy(pred)[None].long(), torch.from_numpy(gt)[None].long()))
    return float(metric.compute()["challenge_iou"])


def test_own_training_never_makes_the_served_model_worse(own, setup):
    """Label frames, train from the server with settings through the API: the served model is replaced only
    when it scores higher on the validation frames (automatic protocol), and the status says which happened."""
    server, bundle = own
    model_file = os.path.join(bundle, "models", "model.pt")
    labelled = ("seq1_00001", "seq1_00002", "seq2_00000", "seq2_00001", "seq3_00000", "seq3_00001")
    _clear_labels(server)  # only these labels: earlier tests of the module leave theirs
    for image_id in labelled:
        assert server.put_label(image_id, open(setup["frames"][image_id][1], "rb").read())[0] == 200
    tau = setup["own_min_mask_fraction"]
    before = torch.load(model_file, weights_only=True)
    task = server.train(
        max_epochs=3,
        val_split=0.5,
        learning_rate=1e-3,
        early_stopping_patience=2,
        absent_prompts_per_frame=1,
        gradient_clip_norm=1.0,
    )
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    result = _train_result(task)
    assert result["settings"]["learning_rate"] == 1e-3 and result["settings"]["early_stopping_patience"] == 2
    validation = result["validation_frames"]
    objects = json.loads(request(f"{server.url}/datastore/?output=all")[1])["objects"]
    assert validation and set(validation) <= {k for k, v in objects.items() if "final" in (v.get("labels") or {})}
    after = torch.load(model_file, weights_only=True)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert (result["served_model"] == "kept") == unchanged
    studies = server_studies(server)
    assert set(validation) < set(labelled)
    # Challenge IoU in percent, recomputed here from the frames' embeddings encoded as the training
    # caches them (the guard's own measure; on float32 embeddings a pixel or two differ on these 64x80 frames)
    iou_before = _auto_iou_of_state(setup, before, validation, tau, studies, as_cached=True)
    iou_after = _auto_iou(setup, model_file, validation, tau, studies, as_cached=True)
    assert result["baseline"] == pytest.approx(iou_before, abs=0.01)
    assert iou_after >= iou_before - 0.01, (iou_before, iou_after, result)
    if result["served_model"] == "replaced":
        assert result["best"] > result["baseline"] and result["best_epoch"] > 0


def _clear_labels(server: Server) -> None:
    """Remove every saved label of the datastore (earlier tests of the module leave theirs)."""
    objects = json.loads(request(f"{server.url}/datastore/?output=all")[1])["objects"]
    for image_id, entry in objects.items():
        for tag in entry.get("labels") or {}:
            assert request(f"{server.url}/datastore/label?id={image_id}&tag={tag}", "DELETE")[0] == 200


def test_own_labels_of_one_video_keep_the_served_model_unless_asked(own, setup):
    """Every label from one video: its validation frames are neighbours of its training frames, so the
    served model is kept whatever they score and the status says why; the best checkpoint, if any, is left
    in the candidate folder. With replace_from_one_video true, the usual rule replaces it."""
    server, bundle = own
    model_file = os.path.join(bundle, "models", "model.pt")
    _clear_labels(server)
    labelled = ("seq1_00000", "seq1_00001", "seq1_00002", "seq1_00003")
    for image_id in labelled:
        assert server.put_label(image_id, open(setup["frames"][image_id][1], "rb").read())[0] == 200
    before = open(model_file, "rb").read()
    settings = dict(max_epochs=3, val_split=0.5, learning_rate=1e-3, early_stopping_patience=0)
    task = server.train(**settings)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    held = _train_result(task)
    assert open(model_file, "rb").read() == before, "a model validated on one video replaced the served one"
    assert held["served_model"] == "kept" and held["validation_videos"] == held["training_videos"] == ["seq1"]
    assert held["validation_frames"] and set(held["validation_frames"]) < set(labelled)
    assert "every labelled frame is from video seq1" in held["reason"]
    assert "label frames of at least two videos, or set replace_from_one_video" in held["reason"]
    assert any("served model KEPT: every labelled frame is from video seq1" in line for line in task["details"])
    candidate = os.path.join(bundle, "eval", "monailabel_candidate", "model.pt")
    assert os.path.isfile(candidate) == (held["best_epoch"] > 0) == ("candidate_model" in held), held
    # the same training (seeded: the same scores) with the setting: the usual rule, replaced exactly when
    # a checkpoint beats the served model. (This random tiny model only gets worse on these frames, so here
    # it is kept by that rule; test_fine_tuning_never_serves_a_worse_model covers the replacement itself.)
    task = server.train(**settings, replace_from_one_video=True)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])[-30:])
    result = _train_result(task)
    assert result["settings"]["replace_from_one_video"] is True and "every labelled frame" not in result["reason"]
    assert "hold" not in result and "candidate_model" not in result and not os.path.exists(candidate)
    assert (result["baseline"], result["best"], result["best_epoch"]) == pytest.approx(
        (held["baseline"], held["best"], held["best_epoch"])
    )
    # (MONAI's best-model saver rewrites models/model.pt with the served weights at epoch 0: compare weights)
    before_state, after_state = (
        torch.load(io.BytesIO(before), weights_only=True),
        torch.load(model_file, weights_only=True),
    )
    changed = any(not torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert changed == (result["served_model"] == "replaced") == (result["best_epoch"] > 0), result
    if result["served_model"] == "kept":
        assert result["reason"] == f"no epoch scored above the served model's {held['baseline']:.4f}"


def test_own_validation_split_takes_whole_videos(setup):
    """The app's split (monailabel_app/lib/trainers.py, run in MONAI Label's environment): frames grouped by
    the video of their image id, whole videos validated on, the same split whatever the datalist's order."""
    code = """
import json, random, sys
sys.path.insert(0, sys.argv[1])
from lib.trainers import SurgicalSAMTrainTask, split_by_video, video_of
ids = ["seq_1_00005", "seq1_00000", "frame", "seq_1_a", "a_b_7", "video_12_3", "00000", "00017", "frame0003",
       "video01_frame0001", "video01-frame-0002", "Case_Frame_12"]
items = [{"image": f"/s/{v}_{i:05d}.png", "label": "l"} for v, n in (("seq_1", 5), ("seq_3", 2), ("seq_5", 3),
         ("seq_7", 2)) for i in range(n)] + [{"image": "/s/extra.jpg", "label": "l"}]
splits = {}
for val_split in (0.1, 0.25, 0.5, 0.9):
    runs = []
    for seed in range(3):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        train, val, train_videos, val_videos = split_by_video(shuffled, val_split)
        runs.append([[d["image"] for d in train], [d["image"] for d in val], train_videos, val_videos])
    splits[val_split] = runs
try:
    split_by_video([d for d in items if "seq_1_" in d["image"]], 0.5)
    one = "no error"
except ValueError as error:
    one = str(error)
task = SurgicalSAMTrainTask.__new__(SurgicalSAMTrainTask)
task._candidate_dir = "/candidates"
partitions = {}
for name, data, settings, val_split in (("one", items[:5], {}, 0.5), ("one_asked", items[:5], {"replace_from_one_video": True}, 0.5),
                                         ("many", items, {}, 0.5), ("bundle", items, {}, -1), ("none", items, {}, 0)):
    task._settings = settings
    train, val = task._partition_datalist(data, {"val_split": val_split})
    partitions[name] = [len(train), None if val is None else len(val), task._split]
print(json.dumps({"videos": [video_of(i) for i in ids], "splits": splits, "one": one, "partitions": partitions}))
"""
    done = subprocess.run(
        [setup["python"], "-c", code, os.path.join(REPO, "monailabel_app")],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    unnamed = "(frames without a video name)"  # bare frame numbers (ffmpeg's %05d) and ids without a number
    assert out["videos"] == [
        "seq_1",
        "seq1",
        unnamed,
        unnamed,
        "a_b",
        "video_12",
        unnamed,
        unnamed,
        unnamed,
        "video01",
        "video01",
        "Case",
    ]
    sizes = {"seq_1": 5, "seq_3": 2, "seq_5": 3, "seq_7": 2, unnamed: 1}
    for val_split, runs in out["splits"].items():
        assert all(run == runs[0] for run in runs), f"val_split {val_split}: the split depends on the order"
        train, val, train_videos, val_videos = runs[0]
        assert train_videos and val_videos and not set(train_videos) & set(val_videos)
        assert sorted(train_videos + val_videos) == sorted(sizes)
        assert len(val) == sum(sizes[v] for v in val_videos) and len(train) + len(val) == 13
        assert {os.path.basename(p).rsplit("_", 1)[0] if "_" in os.path.basename(p) else unnamed for p in val} == set(
            val_videos
        )
        # as close to val_split of the frames as whole videos taken in turn allow: within the largest video
        assert abs(len(val) - float(val_split) * 13) <= max(sizes.values()), (val_split, val_videos)
    assert out["splits"]["0.1"][0][3] != out["splits"]["0.9"][0][3]
    assert "at least two videos" in out["one"]
    one, one_asked, many, bundle, none = (out["partitions"][k] for k in ("one", "one_asked", "many", "bundle", "none"))
    assert one[0] + one[1] == 5 and one[1] > 0 and one[2]["validation_videos"] == ["seq_1"]
    assert "every labelled frame is from video seq_1" in one[2]["hold"] and one[2]["candidate_dir"] == "/candidates"
    assert "hold" not in one_asked[2] and one_asked[:2] == one[:2]
    assert "hold" not in many[2] and not set(many[2]["validation_videos"]) & set(many[2]["training_videos"])
    assert bundle[:2] == [13, None] and none[:2] == [13, 0] and "hold" not in bundle[2] and "hold" not in none[2]


def _auto_iou_of_state(setup, state, image_ids, min_mask_fraction, studies, as_cached=False):
    path = str(setup["root"] / f"state_{uuid.uuid4().hex}.pt")
    torch.save(state, path)
    return _auto_iou(setup, path, image_ids, min_mask_fraction, studies, as_cached=as_cached)


def test_own_train_settings_are_checked_and_failures_say_why(own, setup):
    server, bundle = own
    task = server.train(learning_rate="fast")
    assert task["status"] == "ERROR" and "learning_rate must be a number" in task["details"][-1], task["details"][-5:]
    for mixes in ([0.5, 2], [], "all", [0.5] * 9, [True]):  # each mix costs a validation per epoch: bounded
        task = server.train(weight_mixes=mixes)
        last = task["details"][-1]
        assert task["status"] == "ERROR" and "weight_mixes must be a list of 1 to 8 numbers in (0, 1]" in last, mixes
    task = server.train(new_label_repeats=10**9)  # each repeat is a copy of the new frames in the datalist
    assert task["status"] == "ERROR" and "new_label_repeats must be at most 16" in task["details"][-1], task["details"]
    # a label map edited on disk after it was saved no longer fits its frame: training skips it (with other
    # labels: tests/test_monailabel_names_and_uploads.py), and with no other label the status's last line says why
    _clear_labels(server)
    assert server.put_label("seq1_00001", open(setup["frames"]["seq1_00001"][1], "rb").read())[0] == 200
    label_file = glob.glob(os.path.join(server_studies(server), "labels", "final", "seq1_00001.*"))[0]
    good = open(label_file, "rb").read()
    try:
        with open(label_file, "wb") as handle:
            handle.write(png_bytes(np.zeros((10, 10), np.uint8)))
        task = server.train(val_split=0.0)
        assert task["status"] == "ERROR"
        last = task["details"][-1]
        assert (
            "training failed: TrainingRefused: no labelled frame can be trained on" in last
            and "seq1_00001': 'its label map is 10x10 (height x width) but the frame is 64x80" in last
            and "PUT /datastore/label?image=seq1_00001" in last
        ), task["details"][-5:]
    finally:
        with open(label_file, "wb") as handle:
            handle.write(good)


def test_own_label_then_train(own, setup):
    server, bundle = own
    # no validation frames: the final model replaces the served one only when the request says so
    label_then_train(
        server,
        bundle,
        setup,
        ("seq1_00000", "seq1_00001", "seq1_00002", "seq3_00000"),
        val_split=0.0,
        replace_unvalidated=True,
    )
    assert server.infer("sam_prompt", params={"box": [5, 5, 60, 50]})[0] == 200


# ------------------------------------------------------------------------ own app: a server safe for a team
def _raw(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    """(status, response headers, lower-case names) of one request with exactly ``headers``."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


def _run_in_monailabel(setup, code: str, *args: str) -> dict:
    """Run ``code`` in MONAI Label's environment with the app's folder first on sys.path; its last output line
    is JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SURGICALSAM_TOKEN")}
    done = subprocess.run(
        [setup["python"], "-c", code, os.path.join(REPO, "monailabel_app"), *args],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_own_server_needs_its_access_token(own, setup):
    """The token is made at the first start (studies folder, mode 0600), printed once on the console and never
    in MONAI Label's log; every endpoint but the review page's static files answers 401 without it or with
    another one; MONAI Label's python client gets it through /auth/token (the token as the password) and sends
    it as a bearer token."""
    server, _ = own
    token_file = os.path.join(server.studies, ".surgicalsam_token")
    assert os.path.isfile(token_file), "no token file: the server runs without authentication"
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    token = open(token_file).read().strip()
    assert len(token) >= 32 and TOKENS[server.url] == token
    assert open(server.log, errors="replace").read().count(token) == 1, "the token is not printed exactly once"
    frame = open(setup["frames"]["seq1_00000"][0], "rb").read()
    doors = [
        ("GET", "/info/"),
        ("GET", "/logs/"),
        ("GET", "/model/surgicalsam"),
        ("GET", "/datastore/?output=all"),
        ("GET", "/datastore/image?image=seq1_00000"),
        ("POST", "/infer/surgicalsam?image=seq1_00000"),
        ("PUT", "/model/surgicalsam"),
        ("DELETE", "/datastore/image?id=seq1_00000"),
        ("POST", "/train/surgicalsam"),
        ("GET", "/"),
        ("GET", "/openapi.json"),
        ("GET", "/auth/token/valid"),
    ]
    for method, path in doors:
        for wrong in (None, "not-the-token", token + "x"):
            status, body = request(
                server.url + path, method, files={"file": ("f.png", frame)} if method == "PUT" else None, token=wrong
            )
            assert status == 401, (method, path, wrong, status, body[:200])
        assert "Authorization: Bearer" in json.loads(body)["detail"]
    assert request(server.url + "/info/")[0] == 200
    status, logs = request(server.url + "/logs/?lines=100000")
    assert status == 200 and token.encode() not in logs
    assert request(server.url + "/review/", token=None)[0] == 200  # the page itself (it asks for the token)
    assert request(server.url + "/review/review.js", token=None)[0] == 200
    assert "seq1_00000" in json.loads(request(server.url + "/datastore/?output=all")[1])["objects"]  # nothing deleted
    client = _run_in_monailabel(
        setup,
        """
import json, sys
from monailabel.client import MONAILabelClient
url, token = sys.argv[2], sys.argv[3]
client = MONAILabelClient(url, client_id="slicer-1")
enabled = client.auth_enabled()
try:
    client.info()
    without = "answered"
except Exception as error:
    without = str(getattr(error, "status_code", error))
try:
    client.auth_token("anyone", "wrong-token-of-enough-length")
    wrong = "answered"
except Exception as error:
    wrong = str(getattr(error, "status_code", error))
client.update_auth(client.auth_token("anyone", token))
print(json.dumps({"enabled": enabled, "without": without, "wrong": wrong, "valid": client.auth_valid_token(),
                  "models": sorted(client.info()["models"])}))
""",
        server.url,
        token,
    )
    assert client == {
        "enabled": True,
        "without": "401",
        "wrong": "401",
        "valid": True,
        "models": ["sam_prompt", "surgicalsam", "surgicalsam_class", "surgicalsam_video"],
    }, client


def test_own_server_allows_no_other_origin(own):
    """No browser origin is allowed by default (MONAI Label echoed any origin, with credentials allowed)."""
    server, _ = own
    status, headers = _raw(
        server.url + "/info/",
        headers={"Origin": "http://evil.example", "Authorization": f"Bearer {TOKENS.get(server.url)}"},
    )
    assert status == 200 and "access-control-allow-origin" not in headers, headers
    assert "access-control-allow-credentials" not in headers, headers
    status, headers = _raw(
        server.url + "/info/",
        "OPTIONS",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"},
    )
    assert status >= 400 and "access-control-allow-origin" not in headers, (status, headers)


def test_own_model_upload_must_load_into_the_bundles_network(own, setup):
    """PUT /model/<name> of garbage, or of a state dict of another network, answers 400 and leaves the served
    model.pt as it was (inference still answers); a model.pt of this network replaces it."""
    server, bundle = own
    model_file = os.path.join(bundle, "models", "model.pt")
    served = open(model_file, "rb").read()
    other = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, other)
    for content, reason in ((b"garbage, not a checkpoint", "could not be read"), (other.getvalue(), "does not fit")):
        status, body = request(f"{server.url}/model/surgicalsam", "PUT", files={"file": ("model.pt", content)})
        assert status == 400 and reason in json.loads(body)["detail"], (status, body[:500])
        assert open(model_file, "rb").read() == served
        assert server.infer("surgicalsam")[0] == 200
    assert request(f"{server.url}/model/nosuch", "PUT", files={"file": ("model.pt", served)})[0] == 404
    assert not [f for f in os.listdir(os.path.dirname(model_file)) if f.startswith(".upload-")]
    replacement = open(setup["model"], "rb").read()
    status, body = request(f"{server.url}/model/surgicalsam", "PUT", files={"file": ("model.pt", replacement)})
    assert status == 200, body[:500]
    assert open(model_file, "rb").read() == replacement
    status, body = server.infer("surgicalsam")
    assert status == 200
    np.testing.assert_array_equal(
        png_array(body),
        _expected_auto(setup, model_file, "seq1_00000", min_mask_fraction=setup["own_min_mask_fraction"]),
    )


def test_own_bad_requests_answer_4xx_at_once(own, setup):
    """Requests MONAI Label answered 500, or 200 and then failed in the background: 4xx with the reason."""
    server, _ = own
    frame = png_bytes(np.asarray(Image.open(setup["frames"]["seq1_00000"][0])))
    cases = [
        (request(f"{server.url}/datastore/image?id=nosuch", "DELETE"), 404, "not in the datastore"),
        (
            request(f"{server.url}/datastore/image/info?image=seq1_00000", "PUT", fields={"info": "{not json"}),
            400,
            "not JSON",
        ),
        (
            request(f"{server.url}/datastore/image/info?image=nosuch", "PUT", fields={"info": "{}"}),
            404,
            "not in the datastore",
        ),
        (
            request(f"{server.url}/datastore/label/info?label=seq1_00000&tag=final", "PUT", fields={"info": "[1"}),
            400,
            "not JSON",
        ),
        (
            request(
                f"{server.url}/datastore/updatelabelinfo?label=seq1_00000&tag=nosuch", "PUT", fields={"params": "{}"}
            ),
            404,
            "no label",
        ),
        (request(f"{server.url}/activelearning/x", "POST", json_body={}), 404, "unknown strategy"),
        (server.infer("surgicalsam", params={"device": "nonsense"}), 400, "device must be"),
        (server.infer("surgicalsam", params={"result_extension": "/../x"}), 400, "result_extension"),
        (request(f"{server.url}/scoring/x", "POST", json_body={}), 404, "unknown scoring method"),
        (request(f"{server.url}/batch/infer/x?images=all", "POST", json_body={}), 404, "unknown model"),
    ]
    for (status, body), expected, message in cases:
        assert status == expected, (expected, message, status, body[:300])
        assert message in json.loads(body)["detail"], body
    status, body = server.infer("surgicalsam", image="sub/dir/f")
    assert 400 <= status < 500, (status, body[:300])
    status, body = request(f"{server.url}/datastore/image?image=sub/dir/f", "PUT", files={"file": ("f.png", frame)})
    assert 400 <= status < 500, (status, body[:300])
    for path, key in (("/scoring/?all=true", "method"), ("/batch/infer?all=true", "model")):  # no task was started
        status, body = request(server.url + path)
        tasks = json.loads(body) if status == 200 else []
        assert all((task.get("request") or {}).get(key) != "x" for task in tasks), tasks
    assert server.alive()


def test_own_scoring_scores_only_new_frames(own, setup):
    """A second scoring run (and each next sample's background one) scores only frames with no current score."""
    server, _ = own
    wait_for_no_task(server, "scoring")
    url = f"{server.url}/scoring/surgicalsam_uncertainty?run_sync=true"
    assert request(url, "POST", json_body={"device": "cpu"})[0] == 200
    status, body = request(url, "POST", json_body={"device": "cpu"})
    assert status == 200, body[:300]
    again = json.loads(body)
    assert again["scored"] == 0 and again["already_scored"] > 0 and set(again["failed"]) == {"broken"}, again
    status, body = request(url, "POST", json_body={"device": "cpu", "rescore": True})
    assert status == 200 and json.loads(body)["scored"] == again["already_scored"], body[:300]


def test_own_datastore_reload_keeps_frames_in_the_studies_folder(setup, tmp_path):
    """MONAI Label's reload of datastore.json replaced the datastore before setting its folder: a thread reading
    a frame's path meanwhile got it resolved against the working directory. Reloads run here while another
    thread reads paths and the image list (thread switches every microsecond to widen any window)."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for image_id in ("seq1_00000", "seq1_00001"):
        shutil.copyfile(setup["frames"][image_id][0], studies / f"{image_id}.png")
    out = _run_in_monailabel(
        setup,
        """
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
sys.setswitchinterval(1e-6)
from lib.datastore import CheckedLocalDatastore
from lib.labels import class_table
studies, bundle = sys.argv[2], sys.argv[3]
store = CheckedLocalDatastore(studies, class_table=class_table(bundle), bundle=bundle, extensions=["*.png"])
config = os.path.join(studies, "datastore_v2.json")
bad, done, reloads = [], threading.Event(), [0]
def reload():
    while not done.is_set():
        os.utime(config, ns=(time.time_ns(), time.time_ns() + reloads[0] * 1000))
        store._init_from_datastore_file()
        store._remove_non_existing()
        reloads[0] += 1
worker = threading.Thread(target=reload)
worker.start()
deadline, reads = time.time() + 4, 0
while time.time() < deadline:
    path = store.get_image_uri("seq1_00000")
    if not path.startswith(os.path.realpath(studies)):
        bad.append(path)
    if "seq1_00001" not in store.list_images():
        bad.append("image list without seq1_00001")
    reads += 1
done.set()
worker.join()
print(json.dumps({"bad": bad[:5], "n_bad": len(bad), "reads": reads, "reloads": reloads[0]}))
""",
        str(studies),
        os.path.join(REPO, "bundle"),
    )
    assert out["reloads"] > 100 and out["reads"] > 100, out
    assert out["n_bad"] == 0, out


def test_own_next_sample_reserves_the_frame_for_its_client(own, setup):
    """Alice and Bob ask for the most uncertain frame: each gets another one, reserved for them; Alice asking
    again gets hers again; a reply names the frame by id, never by its path on the server. Bob asks through
    MONAI Label's python client (its client_id)."""
    server, _ = own
    wait_for_no_task(server, "scoring")
    url = f"{server.url}/activelearning/most_uncertain"
    status, body = request(url, "POST", json_body={"device": "cpu", "client_id": "alice"})
    assert status == 200, body[:300]
    alice = json.loads(body)
    assert alice.get("id"), alice
    studies = os.path.realpath(server_studies(server))
    assert studies.encode() not in body and server.studies.encode() not in body, body[:500]
    assert "path" not in alice and alice["client_id"] == "alice" and alice["reserved_s"] > 0
    bob = _run_in_monailabel(
        setup,
        """
import json, sys
from monailabel.client import MONAILabelClient
client = MONAILabelClient(sys.argv[2], client_id="bob")
client.update_auth({"token_type": "Bearer", "access_token": sys.argv[3]})
print(json.dumps(client.next_sample("most_uncertain", {"device": "cpu"})))
""",
        server.url,
        TOKENS[server.url],
    )
    assert bob["id"] != alice["id"] and bob["client_id"] == "bob", (alice, bob)
    assert "path" not in bob and studies not in json.dumps(bob)
    again = json.loads(request(url, "POST", json_body={"device": "cpu", "client_id": "alice"})[1])
    assert again["id"] == alice["id"], (alice, again)
    # reservations lapse after reserve_s and move with the client (the class the server uses, on its own clock)
    out = _run_in_monailabel(
        setup,
        """
import json, sys
sys.path.insert(0, sys.argv[1])
from lib.reservations import Reservations
now = [0.0]
held = Reservations(60, clock=lambda: now[0])
held.reserve("a", "alice"); held.reserve("b", "bob")
first = sorted(held.held_by_others("carol"))
held.reserve("c", "alice")
moved = sorted(held.held_by_others("carol"))
bob_sees = sorted(held.held_by_others("bob"))
now[0] = 61
print(json.dumps({"first": first, "moved": moved, "bob_sees": bob_sees, "lapsed": sorted(held.held_by_others("carol"))}))
""",
    )
    assert out == {"first": ["a", "b"], "moved": ["b", "c"], "bob_sees": ["c"], "lapsed": []}, out


def test_own_access_token_comes_from_the_environment_or_a_private_file(setup, tmp_path):
    """lib/auth.py's token: $SURGICALSAM_TOKEN when set (refused when short), else the studies folder's file,
    made once (0600) and the same at the next start; a file others may read is refused, nothing changed."""
    out = _run_in_monailabel(
        setup,
        """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from lib.auth import AuthSetupError, access_token
studies = sys.argv[2]
first, where = access_token(studies)
again, _ = access_token(studies)
mode = os.stat(where).st_mode & 0o777
def refusal():
    try:
        access_token(studies)
        return "accepted"
    except AuthSetupError as error:
        return str(error)
os.chmod(where, 0o644)
readable = refusal()
os.environ["SURGICALSAM_TOKEN"] = "short"
short = refusal()
os.environ["SURGICALSAM_TOKEN"] = "a-team-token-of-32-characters-ok"
given = access_token(studies)
print(json.dumps({"same": first == again, "length": len(first), "mode": mode, "readable": readable, "short": short,
                  "given": given, "kept": open(where).read().strip() == first}))
""",
        str(tmp_path),
    )
    assert out["same"] and out["length"] >= 32 and out["mode"] == 0o600 and out["kept"], out
    assert "may be read by other users" in out["readable"] and "chmod 600" in out["readable"], out
    assert "at least 16" in out["short"], out
    assert out["given"] == ["a-team-token-of-32-characters-ok", "$SURGICALSAM_TOKEN"], out
