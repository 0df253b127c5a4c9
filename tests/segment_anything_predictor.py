"""segment-anything's own ``SamPredictor`` on one frame with clicks and/or a box: the reference that the
app's ``sam_prompt`` model is compared with (tests/test_monailabel_server.py).

Runs in the MONAI Label environment (``.venv-monailabel``): ``SamPredictor`` imports torchvision, which the
main environment does not have. The SAM is built by the bundle's ``build_sam`` (segment-anything's own
``Sam``, ``ImageEncoderViT``, ``PromptEncoder`` and ``MaskDecoder`` classes) and loaded from the checkpoint.

Usage: ``python segment_anything_predictor.py REQUEST.json OUT.npz`` with REQUEST
``{"variant": ..., "checkpoint": ..., "frame": FILE, "prompts": [{"foreground": [[x, y], ...],
"background": [...], "box": [x0, y0, x1, y1]}, ...], "resize": "predictor"}``. ``resize`` "predictor" (the
default) is the predictor as its users call it (``set_image``: the uint8 frame resized by torchvision on a
PIL image); "app" hands it the frame resized as the app resizes it (float, torch's antialiased bilinear,
``set_torch_image``), which isolates what the resize contributes. OUT holds, per prompt ``i``, ``logits_i`` (H, W)
float32: the logits of the mask the predictor returns (with one click alone, SAM's three masks and the
best-scored one, as the predictor's users pick it; otherwise its single mask).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamPredictor

from scripts.sam.backbone import build_sam
from scripts.sam.geometry import resized_shape


def main(request_file: str, out_file: str) -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    torch.set_num_threads(1)
    predictor = SamPredictor(build_sam(request["variant"], request["checkpoint"]))
    frame = np.array(Image.open(request["frame"]).convert("RGB"))
    if request.get("resize", "predictor") == "predictor":
        predictor.set_image(frame, image_format="RGB")
    else:
        tensor = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        size = resized_shape(frame.shape[:2], predictor.model.image_encoder.img_size)
        predictor.set_torch_image(
            F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True), frame.shape[:2]
        )
    out = {}
    for index, prompts in enumerate(request["prompts"]):
        points = prompts.get("foreground", []) + prompts.get("background", [])
        coords = np.array(points, np.float32) if points else None
        labels = (
            np.array([1] * len(prompts.get("foreground", [])) + [0] * len(prompts.get("background", [])))
            if points
            else None
        )
        box = np.array(prompts["box"], np.float32) if "box" in prompts else None
        with torch.no_grad():
            logits, scores, _ = predictor.predict(
                coords, labels, box, multimask_output=box is None and len(points) == 1, return_logits=True
            )
        out[f"logits_{index}"] = logits[int(np.argmax(scores))].astype(np.float32)
    np.savez(out_file, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
