"""Start a registration of two in-memory images in the background, for a GUI: the inputs and the preset
table (with the user's overrides) go into a run folder, and the engine runs there (see `engine`).
Slicer-free; the Slicer module calls it with images made from its volume nodes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .errors import InputError


def start_registration(run_dir, fixed, moving, *, fixed_modality: str, moving_modality: str, table=None,
                       presets=None, disabled=(), window_voxels: int | None = None, timeout_s: float = 600.0,
                       device: str = "auto", jobs: int | None = None, python=sys.executable, env=None,
                       grace_s: float = 10.0, fixed_mask=None, moving_mask=None, focus=None):
    """Write `fixed` and `moving` (Images) and the table into `run_dir`, start the engine there, and return
    (the EngineRun, the table's name). `table` is a name, a JSON path, a Table or None (the modality pair's
    table); `presets` (names) replaces it. `disabled` presets are left out and a `window_voxels` overrides
    the table's scoring window. `fixed_mask`, `moving_mask` and `focus` (Images, nonzero inside, `masks.FocusBox`es
    or None) are written beside the volumes and passed as ``--fixed-mask`` etc. On any failure the run folder is
    removed."""
    import numpy as np

    from .engine import EngineRun
    from .image import write_image
    from .masks import FocusBox, load_mask
    from .presets import resolve_table

    if presets is not None and not isinstance(presets, str) and not all(isinstance(p, str) for p in presets):
        raise TypeError("presets must be preset names")
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fixed_path, moving_path = run_dir / "fixed.nrrd", run_dir / "moving.nrrd"
        write_image(fixed, fixed_path, compress=False)
        write_image(moving, moving_path, compress=False)
        mask_paths = {}
        for name, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving),
                                  ("focus", focus, fixed)):
            if isinstance(mask, FocusBox):  # a box becomes the voxels of its image it holds
                mask = image.with_array(load_mask(mask, image, name.replace("_", " ")).array.astype(np.uint8))
            if mask is not None:
                mask_paths[name] = run_dir / f"{name}.nrrd"
                write_image(mask, mask_paths[name])
        table_path, table_name = None, "custom"
        if not presets:
            chosen = resolve_table(table, fixed_modality, moving_modality).with_overrides(
                disabled=set(disabled or ()), window_voxels=window_voxels)
            if not chosen.presets:
                raise InputError(f"every preset of table {chosen.name} is switched off")
            table_path, table_name = run_dir / "table.json", chosen.name
            table_path.write_text(json.dumps(chosen.to_dict(), indent=2))
        run = EngineRun.start(run_dir, env=env, grace_s=grace_s, fixed_path=fixed_path, moving_path=moving_path,
                              python=python, table_path=table_path, presets=presets,
                              fixed_modality=fixed_modality, moving_modality=moving_modality,
                              timeout_s=float(timeout_s), device=device, jobs=jobs, keep_all=True, **mask_paths)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run, table_name
