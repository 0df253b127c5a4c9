"""Tests of scripts.files: the one way the bundle writes a file atomically."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from scripts.files import atomic_write, atomic_write_json, temporary_path


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"epoch": 1})

    def half_write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write('{"epoch": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_the_temporary_keeps_the_suffix_for_writers_that_choose_the_format_by_it(tmp_path):
    path = tmp_path / "deep" / "label.png"
    assert temporary_path(path, keep_suffix=True).endswith("label.png.tmp.png")
    assert temporary_path(path) == str(path) + ".tmp"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    atomic_write(path, Image.fromarray(array).save, keep_suffix=True)  # PIL picks PNG from ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), array)
    assert sorted(os.listdir(path.parent)) == ["label.png"]
