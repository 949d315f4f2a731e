"""Where the engine runs inside Slicer: its interpreter, its run folder, and its environment (Slicer's own,
SlicerElastix's library path, Slicer's BRAINSFit, and no ITK_AUTOLOAD_PATH)."""

import logging
import os
import shutil
import sys
import tempfile
import time

import slicer


def brainsfitExecutable():
    """Path of Slicer's BRAINSFit CLI, or None outside Slicer."""
    try:
        return slicer.modules.brainsfit.path
    except AttributeError:
        return None


def elastixLogic():
    """SlicerElastix's logic when that extension is installed and its elastix exists, else None."""
    try:
        import Elastix

        logic = Elastix.ElastixLogic()
        return logic if os.path.isfile(os.path.join(logic.getElastixBinDir(), logic.elastixFilename)) else None
    except Exception:
        return None


def elastixExecutable():
    """Path of SlicerElastix's elastix executable, or None."""
    logic = elastixLogic()
    return os.path.join(logic.getElastixBinDir(), logic.elastixFilename) if logic else None


def engineEnvironment(libraryRoot):
    """Slicer's startup environment with SlicerElastix's library path, Slicer's BRAINSFit, the library at
    `libraryRoot` first on the path, and without ITK_AUTOLOAD_PATH."""
    try:
        env = dict(slicer.util.startupEnvironment())
    except Exception:  # outside the Slicer application
        env = dict(os.environ)
    elastix = elastixLogic()
    if elastix is not None:
        try:  # elastix finds its own libraries as SlicerElastix runs it (Elastix.py getElastixEnv)
            for name, value in elastix.getElastixEnv().items():
                if name.upper() in ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
                    env[name] = value
        except Exception as exc:
            logging.warning(f"AutoRegister: SlicerElastix environment not used: {exc}")
        env["AUTOREGISTER_ELASTIX"] = elastixExecutable()
    if brainsfitExecutable():
        env["AUTOREGISTER_BRAINSFIT"] = brainsfitExecutable()
    # Slicer clears it for its own CLIs: pip's ITK would load Slicer's ITK factories.
    env.pop("ITK_AUTOLOAD_PATH", None)
    env["PYTHONPATH"] = os.pathsep.join([libraryRoot] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pythonExecutable():
    """PythonSlicer inside Slicer (it sets up Slicer's libraries), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def temporaryFolder():
    """A new run folder under Slicer's temporary path."""
    try:
        base = os.path.join(slicer.app.temporaryPath, "AutoRegister")
    except AttributeError:
        base = os.path.join(tempfile.gettempdir(), "AutoRegister")
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base)
