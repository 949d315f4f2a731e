"""Backends: registry, preset params, and real registrations whose fixed->moving convention is checked
numerically against a known transform on a small real T2 -> T1 pair (ICBM152 at 4 mm)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterDev.data import make_case, point_error_mm
from AutoRegisterLib.backends import BACKEND_NAMES, Preset, availability_report, get_backend
from AutoRegisterLib.backends.base import check_params, set_threads
from AutoRegisterLib.errors import BackendUnavailable, InputError
from AutoRegisterLib.image import Image, to_sitk
from AutoRegisterLib.presets import CATALOG_PATH
from AutoRegisterLib.transforms import affine_from_field, as_affine

ROOT = Path(__file__).resolve().parents[1]
CATALOG = json.loads(CATALOG_PATH.read_text())
PRESETS = {d["name"]: Preset.from_dict(d) for d in CATALOG["presets"]}
VOXEL_MM = 4.0


def head(image: Image) -> np.ndarray:
    """The head on the fixed grid, where the point error is judged."""
    from AutoRegisterLib.scoring import head_mask

    return head_mask(image, "T1")


def available(name: str) -> bool:
    """True when the backend can run on this machine."""
    return get_backend(name).availability()[0]


# --- registry and presets ---------------------------------------------------------------------

def test_importing_the_backends_package_imports_no_registration_toolkit():
    code = ("import sys, AutoRegisterLib.backends as b; b.get_backend('sitk'); b.get_backend('brainsfit'); "
            "print(sorted(m for m in ('ants', 'itk') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_names_every_backend_and_reports_each_one_with_a_reason():
    assert set(BACKEND_NAMES) == {"ants", "elastix", "brainsfit", "sitk", "greedy"}
    report = availability_report()
    assert set(report) == set(BACKEND_NAMES)
    assert report["sitk"] == (True, "")
    for ok, reason in report.values():
        assert ok or reason


def test_unknown_backend_is_a_user_error_naming_it():
    with pytest.raises(InputError, match="'nosuch'"):
        get_backend("nosuch")


def test_catalog_holds_the_required_presets_and_each_validates_with_its_backend():
    required = {"ants-rigid", "ants-affine", "ants-syn", "elastix-rigid", "elastix-affine", "elastix-bspline",
                "brainsfit-rigid", "brainsfit-affine", "brainsfit-bspline", "sitk-rigid", "sitk-affine"}
    assert CATALOG["schema"] == "autoregister-presets/1"
    assert required <= set(PRESETS)
    for d in CATALOG["presets"]:
        assert d["description"]
        preset = PRESETS[d["name"]]
        assert isinstance(get_backend(preset.backend).validate(preset), dict)


@pytest.mark.parametrize("backend, params, field", [
    ("ants", {"aff_iterations": "100x50"}, "aff_iterations"),
    ("ants", {"syn_metric": "bogus"}, "syn_metric"),
    ("elastix", {"grid_spacing": 30}, "grid_spacing"),
    ("elastix", {"bspline_iterations": 0}, "bspline_iterations"),
    ("sitk", {"shrink_factors": [4, 2], "smoothing_sigmas_vox": [2.0, 1.0, 0.0]}, "shrink_factors"),
    ("sitk", {"initialization": "random"}, "initialization"),
    ("brainsfit", {"spline_grid_size": [8, 8]}, "spline_grid_size"),
])
def test_bad_preset_params_raise_a_user_error_naming_the_field(backend, params, field):
    transform_type = "deformable" if backend in ("elastix", "brainsfit") else "rigid"
    preset = Preset("bad", backend, transform_type, params)
    with pytest.raises(InputError, match=rf"'bad'.*params\.{field}"):
        get_backend(backend).validate(preset)


def test_a_preset_whose_params_contradict_its_transform_type_is_rejected():
    with pytest.raises(InputError, match="type_of_transform"):
        get_backend("ants").validate(Preset("p", "ants", "rigid", {"type_of_transform": "SyN"}))
    with pytest.raises(InputError, match="stages"):
        get_backend("elastix").validate(Preset("p", "elastix", "affine", {"stages": ["rigid"]}))
    with pytest.raises(InputError, match="rigid and affine"):
        get_backend("sitk").validate(Preset("p", "sitk", "deformable", {}))


def test_check_params_fills_defaults_and_accepts_integers_for_numbers():
    params = check_params(Preset("p", "x", "rigid", {"rate": 1}), {"rate": 0.5, "n": 3})
    assert params == {"rate": 1, "n": 3}


def test_set_threads_limits_simpleitk_and_the_itk_environment():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        assert set_threads(1) == 1
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    finally:
        set_threads(before)


# --- transform helpers -----------------------------------------------------------------------

def test_as_affine_keeps_an_euler_transform_point_for_point_and_its_centre():
    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.2, -0.1, 0.3, (4.0, 5.0, -6.0))
    affine = as_affine(euler)
    assert affine.GetName() == "AffineTransform"
    assert np.allclose(affine.GetCenter(), (10.0, -5.0, 3.0))
    for p in [(0.0, 0.0, 0.0), (50.0, -20.0, 33.0)]:
        assert np.allclose(affine.TransformPoint(p), euler.TransformPoint(p), atol=1e-9)


def test_affine_fitted_to_a_sampled_field_reproduces_the_affine(icbm4):
    known = sitk.AffineTransform((1.02, 0.05, 0.0, -0.03, 0.98, 0.01, 0.0, 0.02, 1.01), (3.0, -2.0, 5.0),
                                 (0.0, 10.0, 0.0))
    ref = to_sitk(icbm4["t1"])
    field = sitk.TransformToDisplacementField(known, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
    fitted = affine_from_field(field)
    for p in [(0.0, 0.0, 0.0), (60.0, -80.0, 40.0)]:
        assert np.allclose(fitted.TransformPoint(p), known.TransformPoint(p), atol=1e-6)


# --- real registrations with a known answer --------------------------------------------------

@pytest.fixture(scope="module")
def rotated_case(icbm4):
    """T2 -> T1 at 4 mm, a known 25° / 10 mm rigid misalignment: plain centre initialisation fails here."""
    return make_case(icbm4["t2"], icbm4["t1"], seed=11, rotation_deg=25.0, translation_mm=10.0)


def check_convention_and_files(out, case, tmp_path, suffix: str):
    """The backend's warped image is sitk.Resample through its transform, which survives a file round trip."""
    fixed, moving = to_sitk(case.fixed), to_sitk(case.moving, np.float32)
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, out.transform, sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32))
    np.testing.assert_allclose(out.warped.array, resampled, atol=1e-3)
    assert out.valid_mask.shape == case.fixed.array.shape and out.valid_mask.mean() > 0.5
    path = tmp_path / f"transform{suffix}"
    sitk.WriteTransform(out.transform, str(path))
    back = sitk.ReadTransform(str(path))
    points = case.fixed.physical_points(np.array([[5, 7, 9], [24, 28, 24], [40, 50, 30]]))
    for p in points:
        assert np.allclose(back.TransformPoint(tuple(p)), out.transform.TransformPoint(tuple(p)), atol=1e-4)


LINEAR = ["ants-rigid", "ants-affine", "elastix-rigid", "elastix-affine", "sitk-rigid", "sitk-affine"]
DEFORMABLE = ["ants-syn", "elastix-bspline"]


@pytest.mark.parametrize("name", LINEAR)
def test_linear_preset_recovers_a_known_rigid_misalignment_within_a_voxel(name, rigid_case4, tmp_path):
    preset = PRESETS[name]
    if not available(preset.backend):
        pytest.skip(get_backend(preset.backend).availability()[1])
    out = get_backend(preset.backend).run(preset, rigid_case4.fixed, rigid_case4.moving, tmp_path / "work", threads=2)
    assert out.transform.GetName() == "AffineTransform"
    mask = head(rigid_case4.fixed)
    assert point_error_mm(rigid_case4, out.transform, mask) < VOXEL_MM
    check_convention_and_files(out, rigid_case4, tmp_path, ".tfm")


@pytest.mark.parametrize("name", DEFORMABLE)
def test_deformable_preset_gives_a_fixed_grid_field_that_recovers_a_known_misalignment(name, icbm4, tmp_path):
    preset = PRESETS[name]
    if not available(preset.backend):
        pytest.skip(get_backend(preset.backend).availability()[1])
    case = make_case(icbm4["t2"], icbm4["t1"], seed=5, rotation_deg=8.0, translation_mm=8.0, warp_mm=3.0)
    mask = head(case.fixed)
    out = get_backend(preset.backend).run(preset, case.fixed, case.moving, tmp_path / "work", threads=2)
    assert out.transform.GetName() == "DisplacementFieldTransform"
    field = sitk.DisplacementFieldTransform(out.transform).GetDisplacementField()
    assert field.GetSize() == case.fixed.size
    assert np.allclose(field.GetOrigin(), case.fixed.origin_mm) and np.allclose(field.GetSpacing(), case.fixed.spacing_mm)
    from AutoRegisterDev.data import initial_error_mm

    assert initial_error_mm(case, mask) > 8.0
    assert point_error_mm(case, out.transform, mask) < VOXEL_MM
    check_convention_and_files(out, case, tmp_path, ".h5")


def test_simpleitk_rigid_converges_from_a_25_degree_rotation(rotated_case, tmp_path):
    out = get_backend("sitk").run(PRESETS["sitk-rigid"], rotated_case.fixed, rotated_case.moving, threads=2)
    mask = head(rotated_case.fixed)
    assert point_error_mm(rotated_case, out.transform, mask) < VOXEL_MM


def test_simpleitk_registration_is_reproducible(rigid_case4):
    runs = [get_backend("sitk").estimate(PRESETS["sitk-rigid"], rigid_case4.fixed, rigid_case4.moving, Path("."), 2)
            for _ in range(2)]
    assert np.allclose(runs[0].GetParameters(), runs[1].GetParameters())


def test_a_2d_pair_registers_with_simpleitk():
    from AutoRegisterDev.data import load_icbm

    t1 = load_icbm("t1", 4.0)
    mid = t1.array.shape[0] // 2
    fixed = Image(t1.array[mid].astype(np.float32), t1.spacing_mm[:2], t1.origin_mm[:2], t1.direction[:2, :2])
    case = make_case(fixed, fixed, seed=2, rotation_deg=10.0, translation_mm=6.0)
    out = get_backend("sitk").run(PRESETS["sitk-rigid"], case.fixed, case.moving, threads=1)
    assert point_error_mm(case, out.transform, head(case.fixed)) < VOXEL_MM


# --- BRAINSFit -------------------------------------------------------------------------------

def test_brainsfit_reports_unavailable_with_its_reason_when_no_executable_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("AUTOREGISTER_BRAINSFIT", raising=False)
    ok, reason = get_backend("brainsfit").availability()
    assert not ok and reason.startswith("BRAINSFit executable not found on PATH")
    with pytest.raises(BackendUnavailable):
        get_backend("brainsfit").run(PRESETS["brainsfit-rigid"], None, None)


FAKE_BRAINSFIT = """\
#!{python}
# A stand-in for BRAINSFit: records its arguments and writes a known fixed->moving transform.
import json, sys
import SimpleITK as sitk
args = sys.argv[1:]
if args == ["--version"]:  # the backend checks that the executable starts
    sys.exit(0)
json.dump(args, open({log!r}, "w"))
out = args[args.index("--outputTransform") + 1]
known = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -3.0, 2.0))
sitk.WriteTransform(sitk.CompositeTransform([known]), out)
"""


def fake_brainsfit(folder: Path) -> tuple[Path, Path]:
    """Write the fake executable into `folder`; return it and the file it logs its arguments to."""
    log = folder / "args.json"
    exe = folder / "BRAINSFit"
    exe.write_text(textwrap.dedent(FAKE_BRAINSFIT).format(python=sys.executable, log=str(log)))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


def test_brainsfit_runs_the_executable_on_path_with_an_argument_list_and_reads_its_transform(
        monkeypatch, tmp_path, rigid_case4):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe, log = fake_brainsfit(bindir)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("AUTOREGISTER_BRAINSFIT", raising=False)
    backend = get_backend("brainsfit")
    assert backend.availability() == (True, "")
    out = backend.run(PRESETS["brainsfit-affine"], rigid_case4.fixed, rigid_case4.moving, tmp_path / "work", threads=2)
    args = json.loads(log.read_text())
    assert args[args.index("--transformType") + 1] == "Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine"
    assert args[args.index("--numberOfThreads") + 1] == "2"
    assert args[args.index("--initializeTransformMode") + 1] == "useMomentsAlign"
    fixed_file = Path(args[args.index("--fixedVolume") + 1])
    assert fixed_file.name == "fixed.mha" and "--splineGridSize" not in args
    known = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -3.0, 2.0))
    assert out.transform.GetName() == "AffineTransform"
    for p in [(0.0, 0.0, 0.0), (30.0, -40.0, 20.0)]:
        assert np.allclose(out.transform.TransformPoint(p), known.TransformPoint(p), atol=1e-6)


def test_brainsfit_bspline_uses_an_explicit_executable_and_returns_a_fixed_grid_field(
        monkeypatch, tmp_path, rigid_case4):
    exe, log = fake_brainsfit(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    preset = Preset("bf", "brainsfit", "deformable", {"executable": str(exe), "spline_grid_size": [6, 7, 8]})
    out = get_backend("brainsfit").estimate(preset, rigid_case4.fixed, rigid_case4.moving, tmp_path / "w", 1)
    args = json.loads(log.read_text())
    assert args[args.index("--splineGridSize") + 1] == "6,7,8"
    assert args[args.index("--transformType") + 1].endswith(",BSpline")
    assert out.GetName() == "DisplacementFieldTransform"
    known = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -3.0, 2.0))
    p = tuple(rigid_case4.fixed.physical_points(np.array([[20, 25, 22]]))[0])
    assert np.allclose(out.TransformPoint(p), known.TransformPoint(p), atol=1e-4)


# --- elastix through an executable (as SlicerElastix ships it) --------------------------------

FAKE_ELASTIX = """\
#!{python}
# A stand-in for elastix: records its arguments and writes the last TransformParameters file.
import json, sys
from pathlib import Path
args = sys.argv[1:]
json.dump(args, open({log!r}, "w"))
out = Path(args[args.index("-out") + 1])
n = args.count("-p")
(out / f"TransformParameters.{{n - 1}}.txt").write_text("(Transform \\"AffineTransform\\")\\n")
"""

FAKE_TRANSFORMIX = """\
#!{python}
# A stand-in for transformix: writes the displacement field of a known affine on the fixed grid.
import json, sys
from pathlib import Path
import SimpleITK as sitk
args = sys.argv[1:]
json.dump(args, open({log!r}, "w"))
fixed = sitk.ReadImage(str(Path(args[args.index("-tp") + 1]).parent / "fixed.mha"))
known = sitk.AffineTransform((1.02, 0.05, 0.0, -0.03, 0.98, 0.01, 0.0, 0.02, 1.01), (3.0, -2.0, 5.0), (0.0, 10.0, 0.0))
field = sitk.TransformToDisplacementField(known, sitk.sitkVectorFloat32, fixed.GetSize(), fixed.GetOrigin(),
                                          fixed.GetSpacing(), fixed.GetDirection())
sitk.WriteImage(field, str(Path(args[args.index("-out") + 1]) / "deformationField.mha"))
"""


def test_elastix_executable_from_the_environment_runs_with_argument_lists_and_its_field_is_read(
        monkeypatch, tmp_path, rigid_case4):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, script in (("elastix", FAKE_ELASTIX), ("transformix", FAKE_TRANSFORMIX)):
        exe = bindir / name
        exe.write_text(textwrap.dedent(script).format(python=sys.executable, log=str(tmp_path / f"{name}.json")))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("AUTOREGISTER_ELASTIX", str(bindir / "elastix"))
    backend = get_backend("elastix")
    assert backend.availability() == (True, "")
    out = backend.run(PRESETS["elastix-affine"], rigid_case4.fixed, rigid_case4.moving, tmp_path / "work", threads=2)
    elastix_args = json.loads((tmp_path / "elastix.json").read_text())
    assert elastix_args.count("-p") == 2  # rigid, then affine
    assert elastix_args[elastix_args.index("-threads") + 1] == "2"
    first = Path(elastix_args[elastix_args.index("-p") + 1]).read_text()
    assert '(Transform "EulerTransform")' in first and "(RandomSeed 17)" in first
    transformix_args = json.loads((tmp_path / "transformix.json").read_text())
    assert transformix_args[:2] == ["-def", "all"]
    known = sitk.AffineTransform((1.02, 0.05, 0.0, -0.03, 0.98, 0.01, 0.0, 0.02, 1.01), (3.0, -2.0, 5.0),
                                 (0.0, 10.0, 0.0))
    assert out.transform.GetName() == "AffineTransform"
    for p in rigid_case4.fixed.physical_points(np.array([[0, 0, 0], [30, 40, 20]])):
        assert np.allclose(out.transform.TransformPoint(tuple(p)), known.TransformPoint(tuple(p)), atol=1e-3)


@pytest.mark.parametrize("name", ["sitk-rigid", "ants-rigid", "elastix-rigid"])
def test_a_backend_writes_nothing_into_the_current_directory(name, icbm4, tmp_path, monkeypatch):
    # itk-elastix's transformix drops deformationField.mha into the working directory unless told otherwise.
    preset = PRESETS[name]
    if not available(preset.backend):
        pytest.skip(get_backend(preset.backend).availability()[1])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    get_backend(preset.backend).run(preset, icbm4["t1"], icbm4["t1"], tmp_path / "work", threads=2)
    assert list(cwd.iterdir()) == []
