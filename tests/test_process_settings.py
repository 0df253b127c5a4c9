"""The bundle's process settings (scripts.engine.process_settings): applied by every entry point, and in effect."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from scripts import BUNDLE_ROOT

# In a fresh process: free a 256 MiB block and see whether the resident memory goes back to the kernel.
PROBE = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, {bundle!r})
    if {apply}:
        from scripts.engine.process_settings import apply_process_settings
        print(apply_process_settings()["allocator"])
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    size = 256 * 2**20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = rss()
    libc.free(ctypes.c_void_p(block))
    print("RETURNED", (before - rss()) / size)
""")


def probe(apply: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(bundle=BUNDLE_ROOT, apply=apply)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split("RETURNED")[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_memory_stays_with_the_process_only_with_the_settings():
    assert probe(apply=False) > 0.9  # glibc's default: a large block is unmapped at free
    assert probe(apply=True) < 0.1  # the bundle's settings: kept for the next step


def test_apply_is_idempotent_and_recorded():
    from scripts.engine.process_settings import apply_process_settings, current_process_settings

    first = apply_process_settings()
    assert apply_process_settings() is first and current_process_settings() is first
    assert first["torch_threads"] >= 1
    if sys.platform.startswith("linux"):
        assert first["allocator"]["mallopt"] == {
            "M_MMAP_MAX": 0,
            "M_TRIM_THRESHOLD": 2**31 - 1,
            "M_TOP_PAD": 64 * 2**20,
        }


# An overlay that writes its own `initialize` replaces the one it is merged over, so each must start with the
# settings; overlays that add steps append with `+initialize` (demo_video.yaml) or fill train.yaml's
# `prepare`/`prepare_cache` (demo.yaml, demo_distill.yaml).
def test_every_config_with_an_initialize_applies_the_settings_first():
    written = []
    for path in sorted(glob.glob(os.path.join(BUNDLE_ROOT, "configs", "*.yaml"))):
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
        if "initialize" in config:
            written.append(os.path.basename(path))
            assert config["initialize"][0] == "$scripts.engine.process_settings.apply_process_settings()", path
    assert {"train.yaml", "inference.yaml", "multi_gpu_train.yaml"} <= set(written)


def test_the_video_demo_keeps_inference_initialize():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [
            os.path.join(BUNDLE_ROOT, "configs", name)
            for name in ("inference.yaml", "inference_video.yaml", "demo_inference.yaml", "demo_video.yaml")
        ]
    )
    initialize = parser["initialize"]
    assert initialize[0] == "$scripts.engine.process_settings.apply_process_settings()"
    assert initialize[-1]["_target_"] == "scripts.data.demo.video.ensure_demo_video"


def test_the_cli_and_the_monailabel_app_apply_the_settings():
    import inspect

    from scripts import cli

    assert "apply_process_settings()" in inspect.getsource(cli.main)
    app = open(os.path.join(os.path.dirname(BUNDLE_ROOT), "monailabel_app", "main.py")).read()
    assert "apply_bundle_process_settings(self.bundle)" in app


def openmp_spin_count(command: list[str], **env_set) -> str:
    """GOMP_SPINCOUNT as the OpenMP runtime of the process ``command`` starts reports it when it loads
    (OMP_DISPLAY_ENV=VERBOSE): 0 under OMP_WAIT_POLICY=PASSIVE, 300000 without the variable."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=BUNDLE_ROOT, **env_set)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = [line.split("=")[1].strip(" '") for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert counts, f"no OpenMP display in the output: {done.stderr[-2000:]}"
    return counts[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's libgomp")
def test_the_cli_loads_openmp_with_the_passive_wait_policy_and_keeps_a_users_value():
    command = [sys.executable, "-m", "scripts.cli", "make_sam_checkpoint", "--help"]
    assert openmp_spin_count([sys.executable, "-c", "import torch"]) != "0"  # the runtime's default spins
    assert openmp_spin_count(command) == "0"  # the bundle's command: PASSIVE before torch loaded
    assert openmp_spin_count(command, OMP_WAIT_POLICY="ACTIVE") != "0"  # the user's value is kept


def test_the_record_says_whether_the_variable_is_in_force_in_this_process_and_reaches_child_processes():
    # as under `python -m monai.bundle run`: torch first, then the bundle's settings
    probe = textwrap.dedent(f"""
        import json, os, subprocess, sys
        import torch
        sys.path.insert(0, {BUNDLE_ROOT!r})
        from scripts.engine.process_settings import apply_process_settings
        record = apply_process_settings()["openmp"]["OMP_WAIT_POLICY"]
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_WAIT_POLICY'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
        print(json.dumps({{"record": record, "child": child}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["record"] == {"value": "PASSIVE", "set_by": "bundle", "in_force_here": False}
    assert out["child"] == "PASSIVE"


def test_the_benchmarks_out_of_the_box_worker_runs_without_the_bundles_variables():
    from scripts.measurement.benchmark import worker_environment

    assert worker_environment(plain=False)["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
    assert "OMP_WAIT_POLICY" not in worker_environment(plain=True)
