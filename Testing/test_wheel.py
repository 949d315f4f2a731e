"""A wheel built from this checkout is complete: installed outside the checkout, it finds its preset
tables and registers, and its worker processes import the wheel's copy of the library."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(tmp: Path) -> dict:
    """The environment without the test run's PYTHONPATH (which names the checkout) and user tables."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tables = tmp / "no-user-tables"
    tables.mkdir(exist_ok=True)
    env["AUTOREGISTER_TABLES"] = str(tables)
    return env


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory):
    """(python, its site-packages, env) of a fresh venv holding only the unpacked wheel and the test venv's
    third-party packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = _clean_env(tmp)
    # Built from a copy, so the build's egg-info and build/ folders never land in the checkout.
    src = tmp / "src"
    shutil.copytree(ROOT / "AutoRegisterLib", src / "AutoRegisterLib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True, env=env, cwd=tmp)
    (wheel,) = dist.glob("*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
    purelib = Path(purelib)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(purelib)
    # numpy, torch, SimpleITK and the toolkits come from the test venv, whose folder is added as a plain
    # path: its .pth files are not run, so the editable install of a checkout cannot answer for AutoRegisterLib.
    (purelib / "test-venv-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python, purelib, env


def _blob_image(shift_vox: float):
    """A small T1-like head: a textured ellipsoid on a dark background, shifted along x."""
    import SimpleITK as sitk

    n = 40
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    c = (n - 1) / 2
    inside = ((x - c - shift_vox) / 15) ** 2 + ((y - c) / 13) ** 2 + ((z - c) / 12) ** 2 <= 1.0
    texture = 1.0 + 0.3 * np.sin((x - shift_vox) / 2.5) * np.cos(y / 3.0) + 0.2 * np.sin(z / 2.0)
    img = sitk.GetImageFromArray((100.0 * inside * texture).astype(np.float32))
    img.SetSpacing((3.0, 3.0, 3.0))
    return img


def test_the_wheel_carries_the_tables_and_registers_from_outside_the_checkout(wheel_python, tmp_path):
    import SimpleITK as sitk

    python, purelib, env = wheel_python
    where = subprocess.run(
        [str(python), "-c", "import AutoRegisterLib.presets as p, AutoRegisterLib.worker as w; "
                            "print(w.__file__); print(p.TABLES_DIR); print(len(p.list_tables()))"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.split("\n")
    assert Path(where[0]).is_relative_to(purelib), where
    assert Path(where[1]).is_relative_to(purelib), where
    assert int(where[2]) == len(list((ROOT / "AutoRegisterLib" / "resources" / "presets" / "tables").glob("*.json")))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sitk.WriteImage(_blob_image(0.0), str(elsewhere / "fixed.nii.gz"))
    sitk.WriteImage(_blob_image(1.5), str(elsewhere / "moving.nii.gz"))
    # The built-in T1 -> T1 table, found inside the wheel; every preset runs in a worker process that
    # can import AutoRegisterLib only from the wheel (no other copy is on this interpreter's path).
    run = subprocess.run(
        [str(python), "-m", "AutoRegisterLib", "fixed.nii.gz", "moving.nii.gz", "--out", "out",
         "--fixed-modality", "T1", "--moving-modality", "T1", "--jobs", "2", "--quiet"],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    # 4: written, but the trust verdict (its calibration read from the wheel) is red on these synthetic blobs.
    assert run.returncode in (0, 4), run.stdout + run.stderr
    result = json.loads((elsewhere / "out" / "result.json").read_text())
    assert (result["trust"]["light"] == "red") == (run.returncode == 4)
    assert result["table"]["name"] == "T1_to_T1"
    assert Path(result["table"]["source"]).is_relative_to(purelib)
    statuses = {c["name"]: c["status"] for c in result["candidates"]}
    # Eliminated in the coarse round still means a worker ran it from the wheel and it was scored.
    assert statuses.get("sitk-rigid") in ("ok", "eliminated"), statuses
    assert next(c for c in result["candidates"] if c["name"] == "sitk-rigid")["score"] > 0
    assert "ok" in statuses.values()
    assert any(p.name.startswith("transform.") for p in (elsewhere / "out").iterdir())
