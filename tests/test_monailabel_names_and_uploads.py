"""The bundle's MONAI Label app against a careless or hostile client: ids and
tags are names, inference reads datastore frames and uploads only, uploads and frames are bounded and leave
no temporary file, a labelled frame is not replaced under its label, and label maps are lossless and hold
the served bundle's class table. One real server for the module (tests/test_monailabel_server.py's helpers).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import struct
import urllib.parse
import zlib

import numpy as np
import pytest
from PIL import Image
from test_monailabel_server import (
    CHROMIUM,
    FRAME,
    REPO,
    REQUEST_TIMEOUT_S,
    TINY,
    TOKENS,
    Server,
    _multipart,
    _studies,
    _train_result,
    png_array,
    png_bytes,
    request,
    server_studies,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_root_logging")]

MAX_UPLOAD_MB = 1
HUGE = (5000, 5000)  # a frame of the studies folder with more pixels than the default max_pixels (4096 x 4096)


def png_of_size(width: int, height: int) -> bytes:
    """A valid black grayscale PNG of ``width`` x ``height``, made without holding its pixels (a few hundred KB
    for 12000 x 12000: the decompression bomb of the issue)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def chunked_upload(url: str, content: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    """PUT ``content`` as the form's ``file``, sent in 64 KiB chunks with no Content-Length (what a client that
    hides the size of its upload does): (status, body)."""
    body, content_type = _multipart({}, {"file": ("frame.png", content)})
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(
            "PUT",
            f"{parts.path}?{parts.query}",
            body=(body[i : i + 65536] for i in range(0, len(body), 65536)),
            headers={"Content-Type": content_type, **(headers or {})},
            encode_chunked=True,
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def guarded(setup, tmp_path_factory):
    """The bundle's own app with ``--conf max_upload_mb 1``, its own TMPDIR (to see temporary files), a frame
    of 5000 x 5000 in its studies folder and a readable frame file ``cwdframe.png`` in its working directory."""
    from scripts.monailabel_glue.bundle_folder import make_monailabel_bundle

    app = str(setup["root"] / "guarded_app")
    shutil.copytree(os.path.join(REPO, "monailabel_app"), app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    studies = _studies(setup, "guarded_studies")
    with open(os.path.join(studies, "huge.png"), "wb") as handle:
        handle.write(png_of_size(*HUGE))
    shutil.copyfile(setup["frames"]["seq1_00000"][0], os.path.join(os.path.dirname(app), "cwdframe.png"))
    bundle = make_monailabel_bundle(
        os.path.join(app, "model", "surgicalsam"), model_file=setup["model"], sam_checkpoint=setup["sam"], settings=TINY
    )
    tmpdir = str(tmp_path_factory.mktemp("server_tmp"))
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmpdir
    try:
        server = Server(
            setup["python"],
            app,
            studies,
            {"threads": "1", "max_upload_mb": str(MAX_UPLOAD_MB)},
            str(setup["root"] / "guarded.log"),
        )
    finally:
        if previous is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = previous
    yield server, bundle, tmpdir
    server.stop()


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def _files(folder: str) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def _label(setup, image_id: str) -> bytes:
    with open(setup["frames"][image_id][1], "rb") as handle:
        return handle.read()


# ------------------------------------------------------------------------------------- 1: names, not paths
def test_ids_and_tags_are_names_not_paths(guarded, setup):
    """Every endpoint that takes an image id or a label tag refuses one that is not a name (400, with the
    rule); nothing is written: the frame a '..' tag pointed at and the folder above the studies are as before."""
    server, _, _ = guarded
    studies = server_studies(server)
    frame_file = os.path.join(studies, "seq1_00001.png")
    frame_before = open(frame_file, "rb").read()
    outside = os.path.dirname(studies)
    outside_before = sorted(os.listdir(outside))
    label = _label(setup, "seq1_00001")
    frame = open(setup["frames"]["seq1_00000"][0], "rb").read()
    url = server.url
    cases = [
        request(f"{url}/datastore/label?image=seq1_00001&tag=..", "PUT", files={"label": ("l.png", label)}),
        request(f"{url}/datastore/label?image=seq1_00001&tag=%2e%2e", "PUT", files={"label": ("l.png", label)}),
        request(f"{url}/datastore/label?image=../seq1_00001&tag=final", "PUT", files={"label": ("l.png", label)}),
        server.infer("surgicalsam", image="seq1_00001", params={"save_label": True, "label_tag": ".."}),
        request(
            f"{url}/datastore/image?image=../../../../{outside.strip('/')}/escaped",
            "PUT",
            files={"file": ("f.png", frame)},
        ),
        request(f"{url}/datastore/image?image=..%2fescaped", "PUT", files={"file": ("f.png", frame)}),
        request(f"{url}/datastore/image", "PUT", files={"file": ("..", frame)}),
        request(f"{url}/datastore/image?image=.hidden", "PUT", files={"file": ("f.png", frame)}),
        request(f"{url}/datastore/image?image=../guarded_studies/seq1_00001"),
        request(f"{url}/datastore/label?label=seq1_00001&tag=../final"),
        request(f"{url}/datastore/label?id=seq1_00001&tag=..", "DELETE"),
        request(f"{url}/datastore/image?id=..%5cseq1_00001", "DELETE"),
        request(f"{url}/datastore/image/info?image=sub/dir/f"),
        request(
            f"{url}/batch/infer/surgicalsam?images=all&run_sync=true",
            "POST",
            json_body={"label_tag": "../x", "device": "cpu"},
        ),
    ]
    for index, (status, body) in enumerate(cases):
        assert status == 400, (index, status, body[:300])
        assert "is not a name" in _detail(body), (index, body[:300])
    assert open(frame_file, "rb").read() == frame_before, "the frame was overwritten"
    assert sorted(os.listdir(outside)) == outside_before, "a file was written outside the studies folder"
    assert server.alive()


# --------------------------------------------------------------------------- 2: no server file is inferred
def test_inference_reads_datastore_frames_and_uploads_only(guarded, setup):
    """A path (absolute, or a file in the server's working directory) is no image: one answer whether it
    exists or not; params cannot name the image; a datastore id and an upload still work."""
    server, _, _ = guarded
    existing = setup["frames"]["seq1_00002"][0]
    for there, absent in ((existing, existing + ".nosuch"), ("cwdframe.png", "nosuch.png")):
        answers = [server.infer("surgicalsam", image=image) for image in (there, absent)]
        statuses = [status for status, _ in answers]
        details = [_detail(body).replace(image, "IMAGE") for (_, body), image in zip(answers, (there, absent))]
        assert statuses[0] == statuses[1] and statuses[0] in (400, 404), (statuses, details)
        assert details[0] == details[1], details
    status, body = server.infer("surgicalsam", image="seq1_00000", params={"image": existing})
    assert status == 400 and "params may not name the image" in _detail(body), body[:300]
    assert server.infer("surgicalsam", image="seq1_00000")[0] == 200
    status, body = server.infer("surgicalsam", image=None, file=open(existing, "rb").read())
    assert status == 200 and png_array(body).shape == FRAME


# ---------------------------------------------------------------------------------- 4: bounded resources
def test_uploads_and_frames_are_bounded_and_leave_no_temporary_file(guarded):
    """A 12000 x 12000 PNG (a few hundred KB) is refused at upload and at inference with the reason, as is a
    frame of the studies folder over max_pixels; an upload over max_upload_mb is 413; refused uploads leave
    no file in the server's temporary folder; 1920x1080 and 1280x1024 frames are stored."""
    server, _, tmpdir = guarded
    bomb = png_of_size(12000, 12000)
    assert len(bomb) < MAX_UPLOAD_MB << 20
    before = _files(tmpdir)
    too_large, far_too_large = os.urandom((MAX_UPLOAD_MB << 20) + 1000), os.urandom(3 * MAX_UPLOAD_MB << 20)
    cases = [  # sent one by one, each checked before the next (on the unfixed server the bomb's inference took 18.9 GB)
        (lambda: server.put_image("bomb", bomb), 400, "max_pixels"),
        (lambda: server.infer("surgicalsam", image=None, file=bomb), 400, "max_pixels"),
        (lambda: server.infer("surgicalsam", image="huge"), 400, "5000x5000 = 25000000 pixels"),
        (lambda: server.put_image("toolarge", too_large), 413, "max_upload_mb"),
        (lambda: server.infer("surgicalsam", image=None, file=too_large), 413, "max_upload_mb"),
        (lambda: server.put_label("seq1_00000", too_large), 413, "max_upload_mb"),
        (lambda: server.put_image("fartoolarge", far_too_large), 413, "max_upload_mb"),  # Content-Length says so
        (
            lambda: chunked_upload(
                f"{server.url}/datastore/image?image=chunked",
                far_too_large,
                {"Authorization": f"Bearer {TOKENS[server.url]}"},
            ),
            413,
            "max_upload_mb",
        ),
        (lambda: server.put_image("corrupt", b"\x89PNG\r\n\x1a\n not a frame"), 400, "cannot read frame"),
        (lambda: server.put_label("seq1_00000", b"not a png"), 400, "not a readable image"),
    ]
    for index, (send, expected, message) in enumerate(cases):
        status, body = send()
        assert status == expected, (index, status, body[:300])
        assert message in _detail(body), (index, body[:300])
    assert _files(tmpdir) == before, f"refused uploads left {sorted(_files(tmpdir) - before)}"
    objects = json.loads(request(f"{server.url}/datastore/?output=all")[1])["objects"]
    assert not {"bomb", "toolarge", "fartoolarge", "chunked", "corrupt"} & set(objects)
    for width, height in ((1920, 1080), (1280, 1024)):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (90, 30, 40)).save(buffer, format="PNG")
        status, body = server.put_image(f"big_{width}", buffer.getvalue())
        assert status == 200, body[:300]
    assert _files(tmpdir) == before, f"stored uploads left {sorted(_files(tmpdir) - before)}"


# -------------------------------------------------------------------------- 5: an image under its label
def test_a_labelled_frame_is_not_replaced_and_training_skips_a_label_that_does_not_fit(guarded, setup):
    """PUT /datastore/image over a labelled id is refused (409, the labels named, frame and label kept); over
    an unlabelled one it replaces the frame and says so. A frame replaced on disk under its label is skipped
    by training, which names it and trains on the others."""
    server, bundle, _ = guarded
    studies = server_studies(server)
    assert server.put_label("seq2_00000", _label(setup, "seq2_00000"))[0] == 200
    frame_file = os.path.join(studies, "seq2_00000.png")
    frame_before = open(frame_file, "rb").read()
    other_size = png_bytes(np.full((48, 60, 3), 120, np.uint8))
    status, body = server.put_image("seq2_00000", other_size)
    assert status == 409 and "has labels ['final']" in _detail(body), body[:300]
    assert open(frame_file, "rb").read() == frame_before
    status, body = request(f"{server.url}/datastore/label?label=seq2_00000&tag=final")
    assert status == 200 and png_array(body).shape == FRAME
    status, body = server.put_image("seq2_00001", open(setup["frames"]["seq2_00002"][0], "rb").read())
    assert status == 200 and json.loads(body) == {"image": "seq2_00001", "replaced": True}, body[:300]

    for image_id in ("seq1_00000", "seq3_00000"):
        assert server.put_label(image_id, _label(setup, image_id))[0] == 200
    with open(frame_file, "wb") as handle:  # replaced on disk, behind the datastore's back
        handle.write(other_size)
    try:
        task = server.train(val_split=0.0, replace_unvalidated=True)
        assert task["status"] == "DONE", "\n".join(task.get("details", [])[-20:])
        skipped = _train_result(task)["skipped_frames"]
        assert list(skipped) == ["seq2_00000"], skipped
        assert "64x80 (height x width) but the frame is 48x60" in skipped["seq2_00000"], skipped
    finally:
        with open(frame_file, "wb") as handle:
            handle.write(frame_before)


# ---------------------------------------------------------------------------------- 8: labels that lie
def test_labels_are_lossless_and_hold_the_served_class_table(guarded, setup):
    """A JPEG label is refused; /info/ shows the bundle's class table; a label with a value the table does
    not hold, or whose declared class names differ from it, is refused naming the table."""
    server, bundle, _ = guarded
    with open(os.path.join(bundle, "configs", "metadata.json")) as handle:
        channels = json.load(handle)["network_data_format"]["outputs"]["pred"]["channel_def"]
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(FRAME, np.uint8)).save(buffer, format="JPEG", quality=95)
    status, body = server.put_label("seq3_00001", buffer.getvalue())
    assert status == 400 and "format JPEG" in _detail(body) and "PNG" in _detail(body), body[:300]

    values = np.zeros(FRAME, np.uint8)
    values[:10, :10] = 9
    status, body = server.put_label("seq3_00001", png_bytes(values))
    assert status == 400 and "class table" in _detail(body) and "7 Clip Applier" in _detail(body), body[:300]

    label = _label(setup, "seq3_00001")
    own_names = json.dumps({"label_names": {"Grasper": 1, "Hook": 2}})
    status, body = request(
        f"{server.url}/datastore/label?image=seq3_00001&tag=final",
        "PUT",
        fields={"params": own_names},
        files={"label": ("l.png", label)},
    )
    assert status == 400 and "disagree with the served bundle's class table" in _detail(body), body[:300]
    assert "Grasper = 1" in _detail(body) and "Bipolar Forceps" in _detail(body)
    slicer_names = json.dumps({"label_info": [{"name": channels["1"], "idx": 1}, {"name": channels["2"], "idx": 2}]})
    status, body = request(
        f"{server.url}/datastore/label?image=seq3_00001&tag=final",
        "PUT",
        fields={"params": slicer_names},
        files={"label": ("l.png", label)},
    )
    assert status == 200, body[:300]
    table = json.loads(request(server.url + "/info/")[1])["class_table"]
    assert table["classes"] == channels and table["unlabelled"] == 255 and "metadata.json" in table["source"]


def test_review_page_shows_the_class_table(guarded):
    """The review page's legend lists the served class table: value and name of each class, and its source."""
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    server, _, _ = guarded
    table = json.loads(request(server.url + "/info/")[1])["class_table"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/review/#token={TOKENS[server.url]}", timeout=60_000)
            page.wait_for_function("document.getElementById('status').textContent.endsWith('frames')", timeout=60_000)
            legend = page.eval_on_selector_all("#legend li", "items => items.map(i => i.textContent)")
            source = page.text_content("#legend-source")
        finally:
            browser.close()
    assert legend == [f"{value} {name}" for value, name in table["classes"].items()]
    assert "metadata.json" in source and "255" in source
