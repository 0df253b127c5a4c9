"""Sharing the bundle: metadata.json against the configs (its versions against the lock file
in tests/test_install.py), large_files.yml against the SAM checkpoint table, the image -> label map network
for verify_net_in_out and the TorchScript export, and ``surgical-sam pack`` unpacked by ``monai.bundle download`` and run alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import bundle_copy_ignore
from PIL import Image

import scripts
from scripts.cli import pack
from scripts.deploy.packing import bundle_name
from scripts.sam.backbone import SAM_DOWNLOAD_URL, SAM_VARIANTS
from scripts.surgical_sam.inferer import ClassPromptInferer
from scripts.surgical_sam.label_map_network import SurgicalSAMLabelMap
from scripts.surgical_sam.network import SurgicalSAM

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO_ROOT, "bundle")
CONFIGS = os.path.join(BUNDLE, "configs")
META_FILE = os.path.join(CONFIGS, "metadata.json")
#: The export configs with the demo's tiny SAM (relative to the bundle folder, as the model card's commands).
EXPORT_CONFIGS = "['configs/inference.yaml','configs/demo_inference.yaml','configs/export.yaml']"


def load_metadata() -> dict:
    with open(META_FILE) as handle:
        return json.load(handle)


def load_yaml(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as handle:
        return yaml.safe_load(handle)


def env_without_repo() -> dict:
    """The environment of a subprocess that must not import the repo's ``scripts`` through PYTHONPATH."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


# ----------------------------------------------------------------------------------------- metadata
def test_metadata_version_changelog_and_package_version_agree():
    metadata = load_metadata()
    assert metadata["version"] in metadata["changelog"]
    newest = max(metadata["changelog"], key=lambda v: tuple(int(p) for p in v.split(".")))
    assert metadata["version"] == newest
    assert scripts.__version__ == metadata["version"]
    with open(os.path.join(REPO_ROOT, "pyproject.toml")) as handle:
        assert re.search(r'^version = "([^"]+)"', handle.read(), re.M).group(1) == metadata["version"]


def test_changelog_is_one_short_line_per_version():
    """model-zoo's shape: the changelog says what changed in a line; measurements and histories live in git."""
    for version, entry in load_metadata()["changelog"].items():
        assert "\n" not in entry and len(entry) <= 300, (version, len(entry))


def test_licence_is_apache_and_the_references_name_both_methods():
    with open(os.path.join(REPO_ROOT, "LICENSE")) as handle:
        assert handle.read().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert os.path.samefile(os.path.join(REPO_ROOT, "LICENSE"), os.path.join(BUNDLE, "LICENSE"))
    references = " ".join(load_metadata()["references"])
    assert "SurgicalSAM" in references and "Distillation-SAM" in references and "Segment Anything" in references


def test_metadata_data_format_names_the_config_classes():
    data_format = load_metadata()["network_data_format"]
    image, pred = data_format["inputs"]["image"], data_format["outputs"]["pred"]
    assert image["num_channels"] == 3 and len(image["spatial_shape"]) == 2
    assert pred["num_channels"] == 1 and len(pred["spatial_shape"]) == 2 and pred["dtype"] == "uint8"
    # train.yaml reads its class names from dataset.json; the EndoVis2018 overlay states the model's
    from monai.bundle import ConfigParser

    for config in (
        ("train.yaml", "endovis2018.yaml"),
        ("inference.yaml",),
        ("inference.yaml", "inference_distill.yaml"),
        ("train.yaml", "monailabel_train.yaml"),
    ):
        parser = ConfigParser()  # (the overlays over train.yaml or inference.yaml, as they are run)
        parser.read_config([os.path.join(BUNDLE, "configs", name) for name in config])
        names = parser.get_parsed_content("class_names")
        assert pred["channel_def"] == {str(i): name for i, name in enumerate(["background", *names])}, config
        assert pred["value_range"] == [0, len(names)]


def test_large_files_list_every_sam_checkpoint_with_its_md5():
    with open(os.path.join(BUNDLE, "large_files.yml")) as handle:
        listed = {entry["path"]: entry for entry in yaml.safe_load(handle)["large_files"]}
    official = {name: spec for name, spec in SAM_VARIANTS.items() if spec.checkpoint_name}
    assert set(official) == {"vit_h", "vit_l", "vit_b"}
    assert set(listed) == {f"models/{spec.checkpoint_name}" for spec in official.values()}
    for spec in official.values():
        entry = listed[f"models/{spec.checkpoint_name}"]
        assert entry["hash_type"] == "md5"
        assert entry["hash_val"] == spec.md5
        assert entry["url"] == SAM_DOWNLOAD_URL + spec.checkpoint_name
    # the configs' SAM checkpoint is the official file of sam_variant, in ckpt_dir
    from monai.bundle import ConfigParser

    for configs, default in (
        (("train.yaml",), "vit_h"),
        (("train.yaml", "train_distill.yaml"), "vit_b"),
        (("inference.yaml",), "vit_h"),
        (("inference.yaml", "inference_distill.yaml"), "vit_b"),
    ):
        for variant in (None, "vit_h", "vit_l", "vit_b"):
            parser = ConfigParser()
            parser.read_config([os.path.join(BUNDLE, "configs", config) for config in configs])
            parser["ckpt_dir"] = "/weights"
            if variant is not None:
                parser["sam_variant"] = variant
            expected = official[variant or default].checkpoint_name
            assert parser.get_parsed_content("sam_checkpoint") == f"/weights/{expected}", (configs, variant)


# ---------------------------------------------------------------------------------- label map network
@pytest.fixture
def demo_model_file(tmp_path, tiny_sam_checkpoint):
    """A SurgicalSAM state dict as training saves it (tiny SAM, random prototypes)."""
    torch.manual_seed(1)
    path = str(tmp_path / "model.pt")
    torch.save(SurgicalSAM(7, 2, (128, 160), "tiny", tiny_sam_checkpoint).state_dict(), path)
    return path


def test_label_map_network_equals_the_auto_protocol(demo_model_file, tiny_sam_checkpoint):
    net = SurgicalSAMLabelMap(7, 2, (128, 160), "tiny", tiny_sam_checkpoint, min_mask_fraction=0.01).eval()
    net.load_state_dict(torch.load(demo_model_file))  # the training checkpoint's keys, strictly
    frames = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        label_map = net(frames)
        expected = ClassPromptInferer(7, "auto", min_mask_fraction=0.01, output="label_map")(frames, net)
    assert label_map.shape == (2, 1, 48, 64) and label_map.dtype == torch.uint8
    assert torch.equal(label_map.long(), expected)
    assert len(label_map.unique()) > 1  # not a trivially empty map


def test_label_map_network_rejects_bad_input(tiny_sam_checkpoint):
    net = SurgicalSAMLabelMap(7, 2, (128, 160), "tiny", tiny_sam_checkpoint).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="min_mask_fraction"):
        SurgicalSAMLabelMap(7, 2, (128, 160), "tiny", tiny_sam_checkpoint, min_mask_fraction=1.5)


def run_bundle_command(*args: str, cwd: str = BUNDLE, timeout: int = 300) -> str:
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env_without_repo())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_verify_net_in_out_on_the_tiny_demo_sam(tiny_sam_checkpoint):
    output = run_bundle_command(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        EXPORT_CONFIGS,
        "--sam_checkpoint",
        tiny_sam_checkpoint,
        "--device",
        "cpu",
        "--any",
        "40",
    )
    assert "verified with no error" in output


def test_torchscript_export_equals_the_eager_network(tmp_path, demo_model_file, tiny_sam_checkpoint):
    ts_file = str(tmp_path / "model.ts")
    run_bundle_command(
        "ckpt_export",
        "network_def",
        "--filepath",
        ts_file,
        "--ckpt_file",
        demo_model_file,
        "--key_in_ckpt",
        "model",  # the model card's command: a trained model.pt nests its weights
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        EXPORT_CONFIGS,
        "--sam_checkpoint",
        tiny_sam_checkpoint,
        "--use_trace",
        "true",
        "--input_shape",
        "[1, 3, 64, 80]",
    )
    extra = {"metadata.json": "", "inference.json": ""}
    exported = torch.jit.load(ts_file, _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == load_metadata()["version"]
    eager = SurgicalSAMLabelMap(7, 2, (128, 160), "tiny", tiny_sam_checkpoint, min_mask_fraction=0.01).eval()
    eager.load_state_dict(torch.load(demo_model_file))
    with torch.no_grad():
        for seed in (0, 1):
            frames = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(seed)) * 255
            logits, _ = eager.class_logits(frames)
            expected = eager(frames)
            got = exported(frames)
            # the label maps agree except where a logit is within float noise of the 0 threshold
            near_zero = (logits.abs() < 1e-4).any(1, keepdim=True)
            assert got.dtype == torch.uint8 and got.shape == expected.shape
            assert torch.equal(got[~near_zero], expected[~near_zero])
            assert (got == expected).float().mean() > 0.999


# -------------------------------------------------------------------------------------------- pack
@pytest.fixture
def bundle_copy(tmp_path):
    """The bundle without generated files, plus what pack must leave out and a trained model.pt."""
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy, ignore=bundle_copy_ignore(BUNDLE))
    for junk in (
        "data/demo/images/x.png",
        "eval/demo/metrics.json",
        "models/sam_vit_b_01ec64.pth",
        "models/sam_vit_b_01ec64.pth.md5",
        "scripts/__pycache__/cli.cpython-311.pyc",
        "models/model.ts",
    ):
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(b"x")
    return copy


def test_pack_holds_the_bundle_and_nothing_generated(tmp_path, bundle_copy):
    (bundle_copy / "models" / "model.pt").write_bytes(b"weights")
    zip_path = pack(out_dir=str(tmp_path / "out"), bundle_root=str(bundle_copy))
    metadata = load_metadata()
    name = bundle_name(metadata)
    assert os.path.basename(zip_path) == f"{name}_v{metadata['version']}.zip"
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert all(n.startswith(name + "/") for n in names)
    inside = {n[len(name) + 1 :] for n in names}
    assert {
        "configs/metadata.json",
        "configs/train.yaml",
        "configs/inference.yaml",
        "configs/export.yaml",
        "scripts/__init__.py",
        "scripts/cli.py",
        "docs/README.md",
        "large_files.yml",
        "LICENSE",
        "models/model.pt",
    } <= inside
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read(f"{name}/LICENSE").decode().split()[:3] == ["Apache", "License", "Version"]
    assert not [
        n
        for n in inside
        if n.startswith(("data/", "eval/")) or n.endswith((".pth", ".md5", ".pyc", ".ts")) or "__pycache__" in n
    ]


def test_pack_without_model_and_bad_bundle_root(tmp_path, bundle_copy, capsys):
    zip_path = pack(out_dir=str(tmp_path / "out"), bundle_root=str(bundle_copy))
    with zipfile.ZipFile(zip_path) as archive:
        assert not [n for n in archive.namelist() if n.endswith("model.pt")]
    assert "no trained models/model.pt" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a bundle folder"):
        pack(out_dir=str(tmp_path / "out"), bundle_root=str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="inside the bundle"):
        pack(out_dir=str(bundle_copy / "dist"), bundle_root=str(bundle_copy))


def test_pack_replaces_its_own_zip_but_never_another_file(tmp_path, bundle_copy):
    first = pack(out_dir=str(tmp_path / "out"), bundle_root=str(bundle_copy))
    assert pack(out_dir=str(tmp_path / "out"), bundle_root=str(bundle_copy)) == first  # its own: replaced
    os.remove(first)
    with open(first, "wb") as handle:
        handle.write(b"not a pack")
    with pytest.raises(SystemExit, match="not a zip that pack wrote"):
        pack(out_dir=str(tmp_path / "out"), bundle_root=str(bundle_copy))
    with open(first, "rb") as handle:
        assert handle.read() == b"not a pack"


@pytest.mark.slow
def test_packed_bundle_downloads_and_runs_inference_alone(tmp_path, bundle_copy, tiny_sam_checkpoint):
    """pack -> monai.bundle download --url file://... -> demo inference inside the unpacked folder only."""
    torch.manual_seed(1)
    torch.save(
        SurgicalSAM(7, 2, (128, 160), "tiny", tiny_sam_checkpoint).state_dict(), bundle_copy / "models" / "model.pt"
    )
    zip_path = pack(out_dir=str(tmp_path / "dist"), bundle_root=str(bundle_copy))
    name, version = bundle_name(load_metadata()), load_metadata()["version"]
    target = tmp_path / "downloaded"
    target.mkdir()
    elsewhere = str(tmp_path)  # download runs outside any bundle
    run_bundle_command(
        "download",
        "--name",
        name,
        "--version",
        version,
        "--url",
        f"file://{zip_path}",
        "--bundle_dir",
        str(target),
        cwd=elsewhere,
    )
    unpacked = target / name
    assert (unpacked / "configs" / "metadata.json").is_file() and (unpacked / "models" / "model.pt").is_file()
    # a few demo-like frames; the tiny SAM checkpoint where demo_inference.yaml expects it
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(frames / f"frame_{index}.png")
    (unpacked / "data").mkdir()
    shutil.copy(tiny_sam_checkpoint, unpacked / "data" / "sam_tiny_demo.pth")
    # the unpacked folder's own scripts: cwd first on sys.path, no PYTHONPATH to the repo
    result = subprocess.run(
        [sys.executable, "-c", "import scripts; print(scripts.__file__)"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        env=env_without_repo(),
        timeout=60,
    )
    assert os.path.dirname(result.stdout.strip()) == str(unpacked / "scripts"), result.stdout + result.stderr
    run_bundle_command(
        "run",
        "--config_file",
        "['configs/inference.yaml','configs/demo_inference.yaml']",
        "--meta_file",
        "configs/metadata.json",
        "--dataset_dir",
        str(frames),
        cwd=str(unpacked),
    )
    # output_dir defaults to <bundle_root>/eval/demo/inference, bundle_root being the imported scripts' folder
    written = sorted(p.name for p in (unpacked / "eval" / "demo" / "inference").rglob("*.png"))
    assert [n for n in written if "overlay" not in n], written
    assert len(written) >= 3
