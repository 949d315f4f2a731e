"""Scene contents shared by the Slicer module and widget tests (slicer-core's real MRML classes)."""

from __future__ import annotations

import numpy as np


def segmentation_of_blocks(slicer, scene, volume, block, names=("Liver",), step: int = 2):
    """A segmentation node with one segment per name on `volume`'s grid: `block` (z, y, x slices), moved `step`
    voxels further in x for each next segment; imported the way Slicer imports a labelmap."""
    from AutoRegisterLib import mrml

    reference = mrml.image_from_volume_node(volume)
    segmentation = scene.AddNode(slicer.vtkMRMLSegmentationNode())
    z, y, x = block
    for i, name in enumerate(names):
        labels = np.zeros(reference.array.shape, np.uint8)
        labels[z, y, slice(x.start + step * i, x.stop + step * i)] = 1
        labelmap = mrml.volume_node_from_image(reference.with_array(labels), scene, name,
                                               node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, "")
        content = segmentation.GetSegmentation()
        content.GetSegment(content.GetNthSegmentID(i)).SetName(name)
        scene.RemoveNode(labelmap)
    return segmentation
