"""The Python packages the engine needs beyond what Slicer bundles, and how to install them inside Slicer."""

import importlib.util
import os
import tempfile

import slicer
from slicer.i18n import tr as _

#: pip name -> (import name, what it enables, required for every run).
PACKAGES = {
    "torch": ("torch", "scoring", True),
    "matplotlib": ("matplotlib", "the report image", False),
    "antspyx": ("ants", "the ANTs presets", False),
    "itk-elastix": ("itk", "the elastix presets (unless SlicerElastix is installed)", False),
}
#: Without these, Register is disabled.
REQUIRED = tuple(pip for pip, (_module, _purpose, required) in PACKAGES.items() if required)


def missing(requiredOnly=False, elastixExecutable=None):
    """pip name -> what is lost, for each package the engine would import but cannot find."""
    found = {}
    for pip, (module, purpose, required) in PACKAGES.items():
        if requiredOnly and not required:
            continue
        if importlib.util.find_spec(module) is None and not (pip == "itk-elastix" and elastixExecutable):
            found[pip] = purpose
    return found


def install(packages):
    """Install packages: torch through the PyTorch extension, the rest by pip with Slicer's numpy, scipy
    and SimpleITK pinned so they are not replaced. Returns what pip installed."""
    packages = list(packages)
    if "torch" in packages:
        packages.remove("torch")
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("PyTorch is installed by the PyTorch extension: install it from the "
                                 "Extensions Manager, restart Slicer, then try again.")) from None
        # The PyTorch extension picks the wheel that matches the GPU (plain pip would pull CUDA on Linux).
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=">=2.1") is None:
            raise RuntimeError(_("PyTorch could not be installed."))
    if packages:
        import importlib.metadata

        pins = []
        for name in ("numpy", "scipy", "SimpleITK"):
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w") as f:
                f.write("\n".join(pins) + "\n")
            slicer.util.pip_install(packages + ["--constraint", constraints])
    return packages
