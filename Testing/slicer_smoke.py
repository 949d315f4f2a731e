"""Smoke test for anyone with 3D Slicer 5.8 or 5.10, from the repository's root:

    Slicer --no-main-window --additional-module-paths AutoRegister --python-script Testing/slicer_smoke.py

It opens the module, binds two small volumes it makes itself (no download), clicks Register, waits, checks
that the transform node is applied and the error is below 1 mm, cancels a second run, prints PASS or FAIL
and exits with 0 or 1. It runs the steps of the module's own Test class (AutoRegisterTest), installing
missing packages first (PyTorch through the PyTorch extension).
"""

import sys
import traceback

import slicer


def main() -> int:
    """Run the module's self-test steps; 0 when every one passed."""
    try:
        slicer.util.selectModule("AutoRegister")
        import AutoRegister

        logic = AutoRegister.AutoRegisterLogic()
        missing = logic.missingDependencies(requiredOnly=True)
        if missing:
            print(f"installing {', '.join(missing)} ...")
            logic.installDependencies(list(missing))
        test = AutoRegister.AutoRegisterTest()
        test.setUp()
        test.test_register_button_runs_in_the_background()
        test.setUp()
        test.test_cancel_leaves_the_scene_alone()
        test.setUp()
        test.test_register_recovers_a_known_rigid_misalignment()
    except Exception:
        traceback.print_exc()
        print("FAIL")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    slicer.util.exit(code)
