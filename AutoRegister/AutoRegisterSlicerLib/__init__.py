"""Slicer-side helpers of the AutoRegister module (Slicer glue kept out of AutoRegister.py, as other
extensions keep theirs in a <Module>Lib package): the Python dependencies, the engine's environment and the
self-test's steps. Registration itself is AutoRegisterLib's."""
