"""The command line: outputs that SimpleITK reproduces, one-line user errors with exit 2, exit 3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterLib.image import write_image
from AutoRegisterLib.presets import TABLES_DIR

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=300):
    """Run `python -m AutoRegisterLib` with an argument list; return the completed process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "AutoRegisterLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pair_files(rigid_case4, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ïnputs with spaces")
    fixed, moving = folder / "fixed T1.nii.gz", folder / "moving 'T2'.nrrd"
    write_image(rigid_case4.fixed, fixed)
    write_image(rigid_case4.moving, moving)
    return fixed, moving


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_writes_outputs_that_simpleitk_reproduces(pair_files, tmp_path):
    fixed, moving = pair_files
    digests = (_digest(fixed), _digest(moving))
    out = tmp_path / "out"
    proc = run_cli(fixed, moving, "--out", out, "--presets", "sitk-rigid,ants-rigid", "--keep-all", "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["best"] in ("sitk-rigid", "ants-rigid")
    assert {c["status"] for c in result["candidates"]} == {"ok"}
    for c in result["candidates"]:
        assert (out / c["transform"]).exists()
    assert (out / "report.png").stat().st_size > 1000
    tx = sitk.ReadTransform(str(out / "transform.tfm"))
    expected = sitk.Resample(sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat32), sitk.ReadImage(str(fixed)),
                             tx, sitk.sitkLinear, 0.0)
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert np.allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected), atol=1e-3)
    assert (_digest(fixed), _digest(moving)) == digests
    assert not list(tmp_path.glob(".out.partial*"))


def test_progress_json_emits_events_and_a_final_exit_code(pair_files, tmp_path):
    fixed, moving = pair_files
    proc = run_cli(fixed, moving, "--out", tmp_path / "o", "--presets", "sitk-rigid", "--progress-json")
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "hello" and isinstance(events[0]["pid"], int)  # the engine's pid, first
    # The pose search runs before any preset starts (AutoRegisterLib/pose.py).
    assert [e["event"] for e in events[1:4]] == ["pose", "pose", "start"]
    assert events[1]["status"] == "start" and events[2]["status"] == "done" and events[2]["applied"] is False
    assert events[-1] == {"event": "done", "exit_code": 0, "message": None}


@pytest.mark.parametrize("make_args, fragment", [
    (lambda f, m, d: [d / "missing.nii.gz", m, "--out", d / "o"], "missing.nii.gz: file not found"),
    (lambda f, m, d: [f, d / "notes.txt", "--out", d / "o"], "notes.txt: not a readable image"),
    (lambda f, m, d: [f, m, "--out", d / "o", "--presets", "ants-rigid,bogus"], "unknown preset(s) bogus"),
    (lambda f, m, d: [f, m, "--out", d / "no" / "such" / "dir"], "output parent folder does not exist"),
    (lambda f, m, d: [f, m, "--out", d / "o", "--table", d / "notes.txt"], "notes.txt: not valid JSON"),
    (lambda f, m, d: [f, m, "--out", d / "o", "--jobs", "0"], "--jobs must be at least 1"),
    (lambda f, m, d: [f, m], "the following arguments are required: --out"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(pair_files, tmp_path, make_args, fragment):
    (tmp_path / "notes.txt").write_text("not an image")
    fixed, moving = pair_files
    proc = run_cli(*make_args(fixed, moving, tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_non_empty_foreign_output_folder_is_refused(pair_files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    proc = run_cli(*pair_files, "--out", out, "--presets", "sitk-rigid")
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (out / "thesis.docx").read_text() == "precious"


def test_no_successful_preset_exits_3_and_still_reports(pair_files, tmp_path):
    table = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    table["presets"] = [{"name": "broken", "backend": "sitk", "transform_type": "rigid",
                         "params": {"iterations": -1}}]
    table["racing"] = None
    (tmp_path / "t.json").write_text(json.dumps(table))
    out = tmp_path / "o"
    proc = run_cli(*pair_files, "--out", out, "--table", tmp_path / "t.json", "--quiet")
    assert proc.returncode == 3
    assert "no preset succeeded" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["best"] is None and result["candidates"][0]["status"] == "failed"
