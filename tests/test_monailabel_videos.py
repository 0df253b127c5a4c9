"""A video as the unit of work in the bundle's MONAI Label app (issue 25, item 3): an mp4 or a zip of frames
uploaded as one item is stored as frames with the video's id, frame index and frame rate; hostile ids and
oversized uploads are refused and leave nothing behind; ``/batch/infer`` pre-labels a whole video with the
temporal presence rule; each frame's state follows the review; a video's labels export as label PNGs, an
overlay video, COCO-style JSON and the class table. One real server for the module (test_monailabel_server's
helpers)."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_monailabel_server import (
    FRAME,
    REPO,
    TINY,
    Server,
    _frame_tensor,
    _network,
    png_array,
    png_bytes,
    request,
    server_studies,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_root_logging")]

MIN_MASK_FRACTION, MIN_RUN, FPS = 0.02, 3, 8.0
MAX_VIDEO_MB = 1


def demo_frames(setup) -> list[str]:
    """The small demo's frames, sequence after sequence: 12 consecutive frames of one 'video'."""
    return [image for _, (image, _) in sorted(setup["frames"].items())]


def mp4_of(paths: list[str], folder) -> bytes:
    from scripts.data.video_io import write_video

    path = str(folder / "clip.mp4")
    write_video(path, (np.asarray(Image.open(p).convert("RGB")) for p in paths), FPS)
    with open(path, "rb") as handle:
        return handle.read()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def put_video(server, video: str, content: bytes, params: dict | None = None, filename: str = "clip.mp4"):
    return request(
        f"{server.url}/video/{video}",
        "PUT",
        fields={"params": json.dumps(params or {})},
        files={"file": (filename, content)},
    )


def stored_files(studies: str) -> list[str]:
    """The frames and label maps in the studies folder (not the datastore's own files)."""
    return sorted(p for p in glob.glob(os.path.join(studies, "**", "*.*"), recursive=True) if not p.endswith(".json"))


def get_json(url: str) -> dict:
    status, body = request(url)
    assert status == 200, body[:500]
    return json.loads(body)


def pre_label(server, video: str) -> dict:
    status, body = request(f"{server.url}/batch/infer/surgicalsam?run_sync=true", "POST", json_body={"video": video})
    assert status == 200, body[:800]
    return json.loads(body)


@pytest.fixture(scope="module")
def video_app(setup, tmp_path_factory):
    """The bundle's own app (temporal presence: on/off at MIN_MASK_FRACTION, changes after MIN_RUN frames),
    an empty studies folder, ``--conf max_video_mb 1``."""
    from scripts.monailabel_glue.bundle_folder import make_monailabel_bundle

    root = tmp_path_factory.mktemp("video_app")
    app = str(root / "app")
    shutil.copytree(os.path.join(REPO, "monailabel_app"), app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    bundle = make_monailabel_bundle(
        os.path.join(app, "model", "surgicalsam"),
        model_file=setup["model"],
        sam_checkpoint=setup["sam"],
        settings={**TINY, "min_mask_fraction": MIN_MASK_FRACTION, "temporal_min_run": MIN_RUN},
    )
    studies = root / "studies"
    studies.mkdir()
    server = Server(
        setup["python"], app, str(studies), {"threads": "1", "max_video_mb": str(MAX_VIDEO_MB)}, str(root / "app.log")
    )
    yield server, bundle, root
    server.stop()


def test_video_upload_stores_its_frames_with_video_frame_index_and_fps(video_app, setup):
    from scripts.data.video_io import open_sequence

    server, _, root = video_app
    content = mp4_of(demo_frames(setup), root)
    status, body = put_video(server, "clip", content)
    assert status == 200, body[:500]
    assert json.loads(body) == {"video": "clip", "frames": 12, "first": "clip_frame00000", "last": "clip_frame00011"}
    listed = get_json(f"{server.url}/video/clip")
    assert [f["id"] for f in listed["frames"]] == [f"clip_frame{i:05d}" for i in range(12)]
    assert [f["state"] for f in listed["frames"]] == ["new"] * 12 and listed["fps"] == FPS
    assert get_json(f"{server.url}/video/")["videos"] == [{"id": "clip", "frames": 12}]
    info = get_json(f"{server.url}/datastore/image/info?image=clip_frame00005")
    assert (info["video"], info["frame_index"], info["fps"]) == ("clip", 5, FPS)
    with open(root / "uploaded.mp4", "wb") as handle:
        handle.write(content)
    decoded = [frame.image for frame in open_sequence(str(root / "uploaded.mp4"))]
    for index in (0, 11):
        status, body = request(f"{server.url}/datastore/image?image=clip_frame{index:05d}")
        np.testing.assert_array_equal(png_array(body), decoded[index])
    # a zip of frames (in name order; fps from params) is stored losslessly
    frames = demo_frames(setup)[:3]
    members = {f"shots/{i:05d}.png": open(p, "rb").read() for i, p in enumerate(frames)}
    status, body = put_video(server, "shots", zip_of(members), {"fps": 2}, "frames.zip")
    assert status == 200, body[:500]
    listed = get_json(f"{server.url}/video/shots")
    assert [f["index"] for f in listed["frames"]] == [0, 1, 2] and listed["fps"] == 2
    status, body = request(f"{server.url}/datastore/image?image=shots_frame00002")
    np.testing.assert_array_equal(png_array(body), np.asarray(Image.open(frames[2]).convert("RGB")))


def test_video_ids_and_uploads_are_hostile_until_checked(video_app, setup):
    server, _, root = video_app
    studies = server_studies(server)
    before = stored_files(studies)
    content = mp4_of(demo_frames(setup)[:2], root)
    for video in ("..", ".hidden", "a%2Fb", "..%2F..%2Fescape", "x" * 118, "sp%20ace"):
        status, body = put_video(server, video, content)
        assert status in (400, 404, 405), (video, status, body[:300])
    for params in ({"video": "../../etc"}, {"video": ".x"}):
        status, body = request(f"{server.url}/batch/infer/surgicalsam?run_sync=true", "POST", json_body=params)
        assert status == 400 and b"video id" in body, body[:300]
    status, body = request(f"{server.url}/batch/infer/surgicalsam?run_sync=true", "POST", json_body={"video": "none"})
    assert status == 404, body[:300]
    assert request(f"{server.url}/video/none")[0] == 404
    assert request(f"{server.url}/video/none/export")[0] == 404
    # not a video, a zip without frames, a zip with a hidden member, an oversized upload: refused, nothing stored
    refusals = {
        "junk": (b"not a video at all" * 100, 400),
        "emptyzip": (zip_of({"readme.txt": b"hello"}), 400),
        "hiddenzip": (zip_of({"a/.evil.png": open(demo_frames(setup)[0], "rb").read()}), 400),
        "big": (os.urandom((MAX_VIDEO_MB << 20) + 4096), 413),
    }
    for video, (upload, expected) in refusals.items():
        status, body = put_video(server, video, upload)
        assert status == expected, (video, status, body[:300])
        assert request(f"{server.url}/video/{video}")[0] == 404
    # one frame of a zip unreadable: the frames before it are removed again
    members = {"0.png": open(demo_frames(setup)[0], "rb").read(), "1.png": b"\x89PNG\r\n\x1a\n broken"}
    status, body = put_video(server, "halfbroken", zip_of(members))
    assert status == 400, body[:300]
    assert request(f"{server.url}/video/halfbroken")[0] == 404
    assert stored_files(studies) == before  # no frame or label left behind
    # the same id twice: refused, the first kept
    assert put_video(server, "twice", content)[0] == 200
    status, body = put_video(server, "twice", content)
    assert status == 409 and get_json(f"{server.url}/video/twice")["frames"][-1]["index"] == 1


def _expected_video_labels(setup, model_file: str, paths: list[str], labelled: dict[int, np.ndarray]) -> dict:
    """The bundle's automatic protocol with its temporal rule over the stored frames in order; frames a person
    labelled feed their classes to the rule instead: {index: label map}."""
    from scripts.deploy.temporal import TemporalPresence
    from scripts.surgical_sam.inferer import ClassPromptInferer

    network = _network(setup, model_file)
    inferer = ClassPromptInferer(7, "auto", MIN_MASK_FRACTION, output="label_map")
    temporal = TemporalPresence(7, MIN_MASK_FRACTION, MIN_MASK_FRACTION, MIN_RUN)
    expected = {}
    for index, path in enumerate(paths):
        if index in labelled:
            counts = np.bincount(labelled[index].flatten(), minlength=256)[1:8]
            temporal.update_counts(torch.tensor(counts)[None], labelled[index].size)
            continue
        with torch.no_grad():
            expected[index] = inferer(_frame_tensor(path), network, temporal=temporal)[0, 0].numpy().astype(np.uint8)
    return expected


def test_batch_pre_labels_a_video_with_the_temporal_rule_and_frames_follow_the_review(video_app, setup):
    from scripts.surgical_sam.inferer import ClassPromptInferer

    server, bundle, root = video_app
    assert put_video(server, "prelabel", mp4_of(demo_frames(setup), root))[0] == 200
    studies = server_studies(server)
    paths = [os.path.join(studies, f"prelabel_frame{i:05d}.png") for i in range(12)]
    model_file = os.path.join(bundle, "models", "model.pt")
    report = pre_label(server, "prelabel")
    assert report["ok"] == 12 and report["failed"] == [] and report["video"] == "prelabel"
    expected = _expected_video_labels(setup, model_file, paths, {})
    network, inferer = _network(setup, model_file), ClassPromptInferer(7, "auto", MIN_MASK_FRACTION, output="label_map")
    with torch.no_grad():
        frame_by_frame = [inferer(_frame_tensor(path), network)[0, 0].numpy() for path in paths]
    assert any((frame_by_frame[i] != expected[i]).any() for i in range(12)), "the temporal rule changed nothing"
    for index in range(12):
        status, body = request(f"{server.url}/datastore/label?label=prelabel_frame{index:05d}&tag=original")
        assert status == 200
        np.testing.assert_array_equal(png_array(body), expected[index], err_msg=f"frame {index}")
    listed = get_json(f"{server.url}/video/prelabel")
    assert [f["state"] for f in listed["frames"]] == ["pre-labelled"] * 12
    assert all(isinstance(f["presence_margin"], float) for f in listed["frames"])
    # a person saves frame 2 as it was (reviewed) and frame 3 changed (corrected)
    assert server.put_label("prelabel_frame00002", png_bytes(expected[2]))[0] == 200
    corrected = expected[3].copy()
    corrected[:10, :10] = 4
    assert server.put_label("prelabel_frame00003", png_bytes(corrected))[0] == 200
    states = [f["state"] for f in get_json(f"{server.url}/video/prelabel")["frames"]]
    assert states[2:4] == ["reviewed", "corrected"] and states.count("pre-labelled") == 10
    # pre-labelling again: the reviewed frames keep their labels and feed the rule
    report = pre_label(server, "prelabel")
    assert report["skipped"] == ["prelabel_frame00002", "prelabel_frame00003"] and report["ok"] == 10
    expected = _expected_video_labels(setup, model_file, paths, {2: expected[2], 3: corrected})
    for index in (4, 5, 6, 11):
        status, body = request(f"{server.url}/datastore/label?label=prelabel_frame{index:05d}&tag=original")
        np.testing.assert_array_equal(png_array(body), expected[index], err_msg=f"frame {index}")
    status, body = request(f"{server.url}/datastore/label?label=prelabel_frame00003&tag=final")
    np.testing.assert_array_equal(png_array(body), corrected)


def _rle_decode(rle: dict) -> np.ndarray:
    height, width = rle["size"]
    flat, value, position = np.zeros(height * width, np.uint8), 0, 0
    for count in rle["counts"]:
        flat[position : position + count] = value
        position, value = position + count, 1 - value
    return flat.reshape((width, height)).T.astype(bool)


def test_video_export_holds_label_pngs_an_overlay_video_coco_json_and_the_class_table(video_app, setup):
    from scripts.data.video_io import open_sequence

    server, _, root = video_app
    assert put_video(server, "export", mp4_of(demo_frames(setup)[:5], root))[0] == 200
    pre_label(server, "export")
    drawn = np.zeros(FRAME, np.uint8)
    drawn[5:20, 10:30] = 2
    assert server.put_label("export_frame00001", png_bytes(drawn))[0] == 200
    status, body = request(f"{server.url}/video/export/export")
    assert status == 200, body[:500]
    archive = zipfile.ZipFile(io.BytesIO(body))
    names = set(archive.namelist())
    assert {f"labels/export_frame{i:05d}.png" for i in range(5)} | {
        "overlay.mp4",
        "annotations.json",
        "class_table.json",
    } == names
    np.testing.assert_array_equal(png_array(archive.read("labels/export_frame00001.png")), drawn)
    status, original = request(f"{server.url}/datastore/label?label=export_frame00000&tag=original")
    assert archive.read("labels/export_frame00000.png") == original
    assert json.loads(archive.read("class_table.json")) == get_json(f"{server.url}/info/")["class_table"]
    with open(root / "overlay.mp4", "wb") as handle:
        handle.write(archive.read("overlay.mp4"))
    assert len(list(open_sequence(str(root / "overlay.mp4")))) == 5
    coco = json.loads(archive.read("annotations.json"))
    assert [image["file_name"] for image in coco["images"]] == [f"labels/export_frame{i:05d}.png" for i in range(5)]
    assert coco["images"][1]["state"] == "corrected"
    assert {c["id"]: c["name"] for c in coco["categories"]} == {
        int(k): v for k, v in get_json(f"{server.url}/info/")["class_table"]["classes"].items() if k != "0"
    }
    (annotation,) = [a for a in coco["annotations"] if a["image_id"] == 2]
    assert annotation["category_id"] == 2 and annotation["bbox"] == [10, 5, 20, 15] and annotation["area"] == 300
    np.testing.assert_array_equal(_rle_decode(annotation["segmentation"]), drawn == 2)
    for image in coco["images"]:
        label = png_array(archive.read(image["file_name"]))
        shown = {a["category_id"] for a in coco["annotations"] if a["image_id"] == image["id"]}
        assert shown == set(np.unique(label).tolist()) - {0, 255}
    assert glob.glob(os.path.join(server_studies(server), "export_frame*.png"))


# -------------------------------------------------------------------------------------------- the page
#: every control of the review page, all reachable on a 1280x720 screen without scrolling
CONTROLS = (
    "video",
    "prelabel",
    "train",
    "train-params",
    "export",
    "upload-file",
    "upload-id",
    "upload",
    "prev",
    "play",
    "next-frame",
    "scrub",
    "next",
    "timeline",
    "class",
    "mode-prompt",
    "mode-brush",
    "mode-eraser",
    "brush-size",
    "auto",
    "sam",
    "erase",
    "clear-prompts",
    "undo",
    "save",
)


def _label(page, frame=FRAME) -> np.ndarray:
    return np.array(page.evaluate("Array.from(state.label)"), np.uint8).reshape(frame)


def _status_is(page, text: str, timeout: int = 120_000) -> None:
    page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps(text)}", timeout=timeout)


def _states(page) -> list[str]:
    return page.eval_on_selector_all("#timeline span", "cells => cells.map(c => c.className.split(' ')[0])")


def test_review_page_annotates_a_video_end_to_end_in_a_browser(video_app, setup, tmp_path):
    """Upload, pre-label, walk the timeline (stored pre-labels shown with no inference), go to the most uncertain
    frame, correct it with a brush, an eraser, undo and SAM's box, be warned before unsaved edits are lost,
    save (the frame turns corrected), train, see the unreviewed frames pre-labelled again, export; every
    control on a 1280x720 screen, and click markers visible on an 854x480 frame."""
    from playwright.sync_api import sync_playwright
    from test_monailabel_server import CHROMIUM, TOKENS

    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    server, _, root = video_app
    clip = root / "e2e.mp4"
    clip.write_bytes(mp4_of(demo_frames(setup)[:6], root))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720}, accept_downloads=True)
            errors, confirms, inferences = [], [], []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda r: inferences.append(r.url) if "/infer/" in r.url else None)

            def answer(dialog):
                if dialog.type == "prompt":
                    dialog.accept(TOKENS[server.url])
                else:  # the unsaved-edits warning: keep the edits
                    confirms.append(dialog.message)
                    dialog.dismiss()

            page.on("dialog", answer)
            page.goto(server.url + "/review/", timeout=60_000)
            page.wait_for_function("document.getElementById('status').textContent.endsWith('frames')", timeout=60_000)
            # upload and pre-label
            page.set_input_files("#upload-file", str(clip))
            page.fill("#upload-id", "e2e")
            page.click("#upload")
            _status_is(page, "e2e: 6 frames stored")
            assert _states(page) == ["state-new"] * 6 and page.input_value("#video") == "e2e"
            page.click("#prelabel")
            _status_is(page, "e2e: 6 frames pre-labelled")
            assert _states(page) == ["state-pre-labelled"] * 6
            # every control within a 1280x720 screen, nothing to scroll to
            for control in CONTROLS:
                box = page.locator(f"#{control}").bounding_box()
                assert box and box["x"] >= 0 and box["y"] >= 0, control
                assert box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 720, (control, box)
            # stored pre-labels are shown, not inferred again; the keys walk the frames
            inferences.clear()
            page.click("#timeline span[data-id='e2e_frame00000']")
            _status_is(page, "e2e_frame00000: stored pre-label")
            page.keyboard.press("ArrowRight")
            _status_is(page, "e2e_frame00001: stored pre-label")
            status, body = request(f"{server.url}/datastore/label?label=e2e_frame00001&tag=original")
            np.testing.assert_array_equal(_label(page), png_array(body))
            page.keyboard.press(" ")  # play: the frames move on (waited for, not timed: the machine may be busy)
            page.wait_for_function("state.frame !== 'e2e_frame00001'", timeout=30_000)
            page.keyboard.press(" ")
            page.wait_for_function("document.getElementById('status').textContent.endsWith(': paused')")
            assert page.evaluate("state.frame") != "e2e_frame00001"
            assert not inferences, inferences
            # "next": the most uncertain unreviewed frame
            frames = get_json(f"{server.url}/video/e2e")["frames"]
            most = min(frames, key=lambda f: (f["presence_margin"], f["index"]))
            page.evaluate("state.frame = null")
            page.keyboard.press("n")
            _status_is(page, f"{most['id']}: stored pre-label")
            target = most["id"]
            pre = _label(page)
            # correct: brush in class 3, erase, undo, SAM box in class 5
            canvas = page.locator("#overlay").bounding_box()
            scale = canvas["width"] / FRAME[1]

            def at(x, y):
                return canvas["x"] + (x + 0.5) * scale, canvas["y"] + (y + 0.5) * scale

            def drag(start, end):
                page.mouse.move(*at(*start))
                page.mouse.down()
                page.mouse.move(*at(*end), steps=6)
                page.mouse.up()

            page.keyboard.press("3")
            page.keyboard.press("b")
            page.fill("#brush-size", "3")
            drag((10, 30), (40, 30))
            brushed = _label(page)
            assert (brushed[30, 10:41] == 3).all() and (brushed[33:, :] == pre[33:, :]).all()
            page.keyboard.press("e")
            drag((10, 30), (20, 30))
            assert (_label(page)[30, 10:21] == 0).all()
            page.keyboard.press("Control+z")
            np.testing.assert_array_equal(_label(page), brushed)
            page.keyboard.press("v")
            page.keyboard.press("5")
            drag((5, 5), (60, 50))
            page.keyboard.press("a")
            page.wait_for_function("document.getElementById('status').textContent.includes('SAM mask added')")
            corrected = _label(page)
            assert (corrected == 5).any() and not np.array_equal(corrected, brushed)
            # unsaved edits: opening another frame asks first, and "keep" keeps them
            other = next(f["id"] for f in frames if f["id"] != target)
            page.click(f"#timeline span[data-id='{other}']")
            page.wait_for_timeout(500)
            assert confirms and "unsaved edits" in confirms[0] and page.evaluate("state.frame") == target
            np.testing.assert_array_equal(_label(page), corrected)
            page.keyboard.press("s")
            _status_is(page, f"{target}: saved")
            status, body = request(f"{server.url}/datastore/label?label={target}&tag=final")
            np.testing.assert_array_equal(png_array(body), corrected)
            index = [f["id"] for f in frames].index(target)
            assert _states(page)[index] == "state-corrected" and _states(page).count("state-pre-labelled") == 5
            # train, then the unreviewed frames are pre-labelled again with the model it leaves
            studies = server_studies(server)
            before = {
                f["id"]: os.stat(os.path.join(studies, "labels", "original", f"{f['id']}.png")).st_mtime_ns
                for f in frames
            }
            page.fill("#train-params", json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.0}))
            page.click("#train")
            _status_is(page, "e2e: 5 frames pre-labelled again", timeout=600_000)
            after = {f: os.stat(os.path.join(studies, "labels", "original", f"{f}.png")).st_mtime_ns for f in before}
            assert [f for f in before if after[f] != before[f]] == [f["id"] for f in frames if f["id"] != target]
            status, body = request(f"{server.url}/datastore/label?label={target}&tag=final")
            np.testing.assert_array_equal(png_array(body), corrected)
            # export
            with page.expect_download() as download:
                page.click("#export")
            path = tmp_path / "export.zip"
            download.value.save_as(str(path))
            exported = zipfile.ZipFile(path)
            np.testing.assert_array_equal(png_array(exported.read(f"labels/{target}.png")), corrected)
            assert {"overlay.mp4", "annotations.json", "class_table.json"} <= set(exported.namelist())
            # click markers on a real-size 854x480 frame: visible squares of several screen pixels
            big = np.asarray(Image.open(demo_frames(setup)[0]).convert("RGB").resize((854, 480)))
            (root / "big.zip").write_bytes(zip_of({"0.png": png_bytes(big)}))
            page.set_input_files("#upload-file", str(root / "big.zip"))
            page.fill("#upload-id", "big")
            page.click("#upload")
            _status_is(page, "big: 1 frames stored")
            page.select_option("#video", "big")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('big_frame00000: ')")
            box = page.locator("#overlay").bounding_box()
            assert box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 720, box
            clip_area = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"]}
            shot = page.screenshot(clip=clip_area)
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            marked = page.screenshot(clip=clip_area)
            changed = (
                np.abs(
                    np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
                    - np.asarray(Image.open(io.BytesIO(marked)).convert("RGB")).astype(int)
                ).sum(-1)
                > 60
            )
            rows, columns = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            assert len(rows) >= 7 and len(columns) >= 7, (len(rows), len(columns))
            page.screenshot(path=str(tmp_path / "page.png"))
            assert not errors, errors
        finally:
            browser.close()
