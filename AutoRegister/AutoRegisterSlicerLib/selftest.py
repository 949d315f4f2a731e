"""The steps of AutoRegister's self-test, shared by the module's Test class (Reload and Test, the CTest
`py_AutoRegister`) and Testing/slicer_smoke.py: two small volumes it makes itself (no download), the console
API, the Register button, and Cancel. Needs a running Slicer for the button steps.
"""

import os
import tempfile
import time

import slicer


class SelfTestSteps:
    """Mixed into a unittest.TestCase that sets `logicClass` (AutoRegisterLogic)."""

    logicClass = None

    @staticmethod
    def makeHeadPhantom(size=48, spacing=4.0):
        """A small asymmetric head-like volume (library Image, LPS): scalp, brain, a ventricle, a lesion, texture."""
        import numpy as np

        from AutoRegisterLib.image import Image

        z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
        head = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.75) ** 2
        volume = np.where(head < 1.0, 300.0, 0.0) + np.where(head < 0.8, 500.0, 0.0)
        volume += np.where(((x - 0.15) / 0.12) ** 2 + (y / 0.35) ** 2 + ((z - 0.1) / 0.15) ** 2 < 1, -400, 0)
        volume += np.where(((x + 0.35) / 0.15) ** 2 + ((y - 0.3) / 0.1) ** 2 + ((z + 0.2) / 0.2) ** 2 < 1, 300, 0)
        # Texture at the scale of a few voxels, like gyri: a smooth ellipsoid alone pins no rotation down.
        texture = np.random.default_rng(7).normal(size=volume.shape)
        kernel = np.exp(-0.5 * (np.arange(-3, 4) / 1.2) ** 2)
        for axis in range(3):
            texture = np.apply_along_axis(lambda v: np.convolve(v, kernel / kernel.sum(), "same"), axis, texture)
        volume += 400.0 * texture / texture.std() * (head < 0.8)
        origin = (-(size - 1) * spacing / 2,) * 3
        return Image(volume.astype(np.float32), (spacing,) * 3, origin)

    @staticmethod
    def knownTransform(image):
        """A known rigid misalignment about the volume's centre (about 5 degrees and 7 mm)."""
        import numpy as np
        import SimpleITK as sitk

        centre = image.physical_points(np.array([[(n - 1) / 2 for n in image.size]]))[0]
        return sitk.Euler3DTransform(tuple(float(c) for c in centre), 0.06, -0.04, 0.08, (4.0, -3.0, 4.0))

    @classmethod
    def makeCase(cls, scene, fixedImage):
        """Fixed and moving volume nodes; moving(x) = fixed(truth(x)), so the right answer is truth's inverse."""
        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import resample_to_grid

        truth = cls.knownTransform(fixedImage)
        fixed = mrml.volume_node_from_image(fixedImage, scene, "AutoRegister test fixed")
        moving = mrml.volume_node_from_image(resample_to_grid(fixedImage, fixedImage, truth), scene,
                                             "AutoRegister test moving")
        return fixed, moving, truth

    def meanErrorMm(self, transformNode, fixedImage, truth):
        """Mean |truth(T(p)) - p| over points inside the fixed volume, T being the node's fixed->moving map."""
        import numpy as np

        from AutoRegisterLib import mrml

        rng = np.random.default_rng(0)
        points = fixedImage.physical_points(rng.uniform(0.25, 0.75, size=(200, 3)) * np.array(fixedImage.size))
        errors = []
        for p in points:
            mapped = mrml.LPS_FROM_RAS @ mrml.transform_point_ras(transformNode, mrml.LPS_FROM_RAS @ p)
            errors.append(np.linalg.norm(np.array(truth.TransformPoint(tuple(float(v) for v in mapped))) - p))
        return float(np.mean(errors))

    def test_register_recovers_a_known_rigid_misalignment(self):
        """Console API: the result's transform node is the moving parent and matches the truth."""
        self.delayDisplay("Registering a phantom to a moved copy")
        fixedImage = self.makeHeadPhantom()
        fixed, moving, truth = self.makeCase(slicer.mrmlScene, fixedImage)
        before = moving.GetImageData().GetScalarRange()
        logic = self.logicClass()
        # The mechanics are under test, not the verdict: a red one must not stop the run with a question.
        result = logic.register(fixed, moving, presets=["sitk-rigid", "sitk-affine"], createOutputVolume=True,
                                fixedModality="T1", movingModality="T1", timeout=600, applyUntrusted=True)
        self.assertIsNotNone(result.best)
        self.assertEqual(len(result.candidates), 2)
        self.assertEqual(moving.GetParentTransformNode(), result.transformNode)
        self.assertEqual(moving.GetImageData().GetScalarRange(), before)  # input voxels untouched
        self.assertLess(self.meanErrorMm(result.transformNode, fixedImage, truth), 1.0)
        # Running again replaces our nodes instead of adding more.
        transforms = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
        again = logic.register(fixed, moving, presets=["sitk-rigid"], createOutputVolume=True,
                               fixedModality="T1", movingModality="T1", timeout=600, applyUntrusted=True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode"), transforms)
        self.assertEqual(again.outputVolume.GetID(), result.outputVolume.GetID())
        result.cleanup()
        again.cleanup()
        self.delayDisplay("Console registration passed")

    def _widgetWithCase(self):
        """The module's widget bound to a fresh phantom case and a one-preset table file."""
        import json

        fixedImage = self.makeHeadPhantom()
        fixed, moving, truth = self.makeCase(slicer.mrmlScene, fixedImage)
        slicer.util.selectModule("AutoRegister")
        widget = slicer.modules.AutoRegisterWidget
        table = os.path.join(tempfile.mkdtemp(prefix="AutoRegisterTest-"), "sitk-rigid.json")
        with open(table, "w") as f:
            json.dump({"schema": "autoregister-table/1", "name": "self-test", "fixed_modality": "T1",
                       "moving_modality": "T1", "presets": ["sitk-rigid"]}, f)
        p = widget._parameterNode
        p.fixedVolume, p.movingVolume = fixed, moving
        p.fixedModality = p.movingModality = "T1"
        p.tableName = table
        return widget, fixed, moving, truth, fixedImage

    def _waitWhileRunning(self, widget, seconds):
        deadline = time.monotonic() + seconds
        while widget._run is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._run, "the run did not end in time")

    def test_register_button_runs_in_the_background(self):
        """GUI: the button starts the engine, Slicer keeps processing events, the table fills."""
        widget, fixed, moving, truth, fixedImage = self._widgetWithCase()
        self.assertTrue(widget.ui.registerButton.enabled, widget.ui.registerButton.toolTip)
        widget.ui.registerButton.click()
        self._waitWhileRunning(widget, 600)
        self.assertIsNotNone(widget._result, widget.ui.statusLabel.text)
        self.assertGreater(widget.ui.resultsTable.rowCount, 0)
        self.assertEqual(moving.GetParentTransformNode(), widget._result.transformNode)
        self.assertLess(self.meanErrorMm(widget._result.transformNode, fixedImage, truth), 1.0)
        self.delayDisplay("Register button passed")

    def test_cancel_leaves_the_scene_alone(self):
        """GUI: Cancel during a run ends it without a dialog, applies nothing and removes its files."""
        widget, fixed, moving, truth, fixedImage = self._widgetWithCase()
        widget.ui.registerButton.click()
        run = widget._run
        self.assertIsNotNone(run)
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "hello" for e in run.engine.events) and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        widget.ui.cancelButton.click()
        self._waitWhileRunning(widget, 60)
        self.assertIsNone(moving.GetParentTransformNode())
        self.assertFalse(os.path.exists(run.engine.run_dir))
        self.assertIn("Cancelled", widget.ui.statusLabel.text)
        self.delayDisplay("Cancel passed")
