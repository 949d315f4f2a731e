"""Command line: ``autoregister FIXED MOVING --out DIR`` (also ``python -m AutoRegisterLib``).

Exit codes (`events.ExitCode`): 0 a result was kept (trust verdict green or amber); 2 bad input or usage, or
torch (needed to score) is not installed (one line on stderr, no traceback, before any worker starts); 3 no
preset succeeded; 4 a result was written but its trust verdict is red (never applied silently); 130 cancelled
(Ctrl-C, SIGTERM or ``--cancel-file``).

With ``--progress-json`` the command is the engine of the Slicer module and of `engine.EngineRun`: stdout
carries one JSON event per line (see `events`), the first ``hello`` with the engine's pid and version,
the last ``done`` with the exit code. ``--cancel-file PATH`` cancels the run once PATH exists (the engine
kills its workers, removes its temporary folder and exits 130); ``--work-dir DIR`` puts every temporary
file of the run (the engine's, the workers', the external tools') under DIR.

``--fixed-mask``, ``--moving-mask`` and ``--focus`` take a labelmap file (nonzero inside) or a Slicer segmentation
(``.seg.nrrd``) with ``--fixed-mask-segment`` etc. naming the segment. A bad mask (empty, outside its image, 2D
for a 3D image, a missing segment, unreadable) is a usage error reported before any preset runs; one on another
grid is resampled onto its image's, with an ``autoregister: note:`` line on stderr when that loses something.
"""

from __future__ import annotations

import os
import signal
import sys

from .cli_common import Parser, ProgressBar  # noqa: F401  (ProgressBar: also imported from here)
from .errors import Cancelled, InputError
from .events import DEVICES, ExitCode, event_line, is_cancelled

# Older names of the exit codes, for code that imported them from here.
EXIT_OK, EXIT_USAGE, EXIT_NO_RESULT, EXIT_CANCELLED = (ExitCode.OK, ExitCode.USAGE, ExitCode.NO_RESULT,
                                                       ExitCode.CANCELLED)
_Parser = Parser

#: The mask options (flag, what `masks.load_mask` calls it), each with a ``-segment`` companion.
MASK_OPTIONS = (("fixed-mask", "fixed mask"), ("moving-mask", "moving mask"), ("focus", "focus"))
MASK_HELP = {
    "fixed-mask": "where the fixed image holds what matters: a labelmap (nonzero inside) or a .seg.nrrd",
    "moving-mask": "where the moving image holds what matters: a labelmap (nonzero inside) or a .seg.nrrd",
    "focus": "the structure of the fixed image to align best (a labelmap or a .seg.nrrd): the result is judged there",
}

#: Set by Slicer's launcher; a process that loads pip's ITK/ANTs with it set can crash (Slicer clears it
#: for its own CLI modules too: Base/Logic/vtkSlicerCLIModuleLogic.cxx).
ITK_AUTOLOAD = "ITK_AUTOLOAD_PATH"


def build_parser() -> Parser:
    """The argument parser of the register command."""
    p = Parser(prog="autoregister", description="One-click registration of MOVING onto FIXED.",
               epilog="Exit codes: 0 a result was kept (trust verdict green or amber); 2 bad input or usage, or "
                      "torch is not installed; 3 no preset succeeded; 4 a result was written but its trust "
                      "verdict is red; 130 cancelled.")
    p.add_argument("fixed", help="fixed (reference) image: NIfTI, NRRD, MHA or a DICOM folder")
    p.add_argument("moving", help="moving image, registered onto the fixed image")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--fixed-modality", help="T1, T2, FLAIR, PD, CT or MR (guessed when omitted)")
    p.add_argument("--moving-modality", help="T1, T2, FLAIR, PD, CT or MR (guessed when omitted)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--table", help="preset table JSON file")
    group.add_argument("--presets", help="comma-separated preset names to race instead of a table")
    for flag, what in MASK_OPTIONS:
        p.add_argument(f"--{flag}", metavar="PATH", help=MASK_HELP[flag])
        p.add_argument(f"--{flag}-segment", metavar="NAME",
                       help=f"the segment of the {what} to use, when --{flag} is a Slicer segmentation (.seg.nrrd)")
    p.add_argument("--keep-all", action="store_true", help="write every successful candidate's transform")
    p.add_argument("--jobs", type=int, help="parallel workers (default: one per core)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per preset (default 600)")
    p.add_argument("--memory-limit-mb", type=int,
                   help="cap each preset's worker at this much address space (default: no cap)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="device for scoring")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("--progress-json", action="store_true",
                   help="write progress events as JSON lines on stdout (for the Slicer module)")
    p.add_argument("--cancel-file", help="cancel the run (exit 130, nothing written) once this file exists")
    p.add_argument("--work-dir", help="folder for the run's temporary files (default: the system's)")
    p.add_argument("--no-pose-search", action="store_true",
                   help="start every preset from the headers' pose (default: race starting poses first)")
    p.add_argument("--output-grid", default="fixed", choices=("fixed", "union"),
                   help="warped.nii.gz on the fixed grid (default), or on the fixed grid grown to keep the "
                        "whole moving extent")
    return p


def engine_command(fixed_path, moving_path, out_dir, *, python=sys.executable, table_path=None, presets=None,
                   fixed_modality=None, moving_modality=None, timeout_s=600, device="auto", jobs=None,
                   keep_all=True, cancel_file=None, work_dir=None, memory_limit_mb=None, fixed_mask=None,
                   fixed_mask_segment=None, moving_mask=None, moving_mask_segment=None, focus=None,
                   focus_segment=None) -> list[str]:
    """The argument list that runs the engine (``python -m AutoRegisterLib ... --progress-json``).

    Built here, beside `build_parser`, so each flag has one owner. `python` is the interpreter, or a list
    (a launcher, interpreter options). `presets` is a list or comma-separated names (instead of
    `table_path`); the paths come last, after ``--``, so a file name may start with '-'. `fixed_mask`,
    `moving_mask` and `focus` are mask files, each with its segment's name for a Slicer segmentation.
    """
    if table_path is not None and presets:
        raise ValueError("give table_path or presets, not both")
    interpreter = [str(python)] if isinstance(python, (str, os.PathLike)) else [str(p) for p in python]
    cmd = interpreter + ["-m", "AutoRegisterLib", "--out", str(out_dir), "--progress-json"]
    if fixed_modality:
        cmd += ["--fixed-modality", str(fixed_modality)]
    if moving_modality:
        cmd += ["--moving-modality", str(moving_modality)]
    if table_path is not None:
        cmd += ["--table", str(table_path)]
    elif presets:
        cmd += ["--presets", presets if isinstance(presets, str) else ",".join(presets)]
    cmd += ["--timeout", str(float(timeout_s)), "--device", str(device)]
    if jobs:
        cmd += ["--jobs", str(int(jobs))]
    if memory_limit_mb:
        cmd += ["--memory-limit-mb", str(int(memory_limit_mb))]
    if keep_all:
        cmd.append("--keep-all")
    if cancel_file is not None:
        cmd += ["--cancel-file", str(cancel_file)]
    if work_dir is not None:
        cmd += ["--work-dir", str(work_dir)]
    given = {"fixed-mask": (fixed_mask, fixed_mask_segment), "moving-mask": (moving_mask, moving_mask_segment),
             "focus": (focus, focus_segment)}
    for flag, (path, segment) in given.items():
        if path is None and segment is not None:
            raise ValueError(f"{flag.replace('-', '_')}_segment needs {flag.replace('-', '_')}")
        if path is not None:
            # "--flag=value": a path that starts with '-' is still the option's value.
            cmd.append(f"--{flag}={path}")
            if segment is not None:
                cmd.append(f"--{flag}-segment={segment}")
    return cmd + ["--", str(fixed_path), str(moving_path)]


def _library_root() -> str:
    """The folder this engine imported AutoRegisterLib from (a client checks it is the copy it expects)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _option_value(args, flag: str):
    """The parsed value of ``--flag``."""
    return getattr(args, flag.replace("-", "_"))


def _json_progress(event: dict) -> None:
    sys.stdout.write(event_line(event) + "\n")
    sys.stdout.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def register_main(argv) -> int:
    """Run the register command; return the exit code."""
    argv = list(argv)
    options = argv[: argv.index("--")] if "--" in argv else argv
    if "--progress-json" in options:
        from . import __version__

        # First, before anything can fail: the client learns the engine's own pid (not a launcher's).
        _json_progress({"event": "hello", "pid": os.getpid(), "version": __version__, "library": _library_root()})
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, _ in MASK_OPTIONS:
        if _option_value(args, f"{flag}-segment") is not None and _option_value(args, flag) is None:
            parser.error(f"--{flag}-segment needs --{flag}")
    cancel = None
    if args.cancel_file:
        cancel_file = args.cancel_file
        cancel = lambda: os.path.exists(cancel_file)  # noqa: E731  (polled by the runner every 50 ms)
    if os.name == "posix" and hasattr(signal, "SIGTERM"):
        try:  # SIGTERM cancels like Ctrl-C: workers killed, temporary files removed, exit 130
            signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:  # not the main thread (register_main called from a thread)
            pass
    if args.work_dir:
        # Everything temporary, in this process and in every worker and tool it starts, goes there.
        os.makedirs(args.work_dir, exist_ok=True)
        os.environ["TMPDIR"] = os.environ["TEMP"] = os.environ["TMP"] = os.path.abspath(args.work_dir)
        import tempfile

        tempfile.tempdir = None  # recomputed from TMPDIR on next use
    bar = None
    try:
        if is_cancelled(cancel):
            raise Cancelled("cancelled before the start")
        if args.jobs is not None and args.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {args.jobs}")
        if args.timeout <= 0:
            raise InputError(f"--timeout must be positive, got {args.timeout}")
        if args.memory_limit_mb is not None and args.memory_limit_mb <= 0:
            raise InputError(f"--memory-limit-mb must be positive, got {args.memory_limit_mb}")
        from .image import read_image
        from .report import check_output_dir, format_table, write_outputs

        check_output_dir(args.out)
        fixed = read_image(args.fixed)
        moving = read_image(args.moving)
        from .masks import MaskSpec, load_user_masks

        # Here, not only inside auto_register: a bad mask fails before anything else loads, and the notes come
        # first, not after the run.
        user_masks = load_user_masks(fixed, moving, **{
            what.replace(" ", "_"): MaskSpec(_option_value(args, flag), _option_value(args, f"{flag}-segment"))
            for flag, what in MASK_OPTIONS if _option_value(args, flag) is not None})
        for note in user_masks.notes():
            print(f"autoregister: note: {note}", file=sys.stderr, flush=True)
        from .pipeline import auto_register

        if args.progress_json:
            progress = _json_progress
        elif not args.quiet:
            progress = bar = ProgressBar()
        else:
            progress = None
        try:
            result = auto_register(
                fixed, moving, fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
                table=args.table, presets=args.presets, jobs=args.jobs, timeout_s=args.timeout,
                device=args.device, progress=progress, memory_limit_mb=args.memory_limit_mb, cancel=cancel,
                work_dir=args.work_dir, pose_search=not args.no_pose_search,
                output_grid=args.output_grid, fixed_mask=user_masks.fixed, moving_mask=user_masks.moving,
                focus=user_masks.focus)
        finally:
            if bar is not None:
                bar.close()
                bar = None
        if is_cancelled(cancel):
            raise Cancelled("cancelled before the outputs were written")
        result.inputs.update(fixed=args.fixed, moving=args.moving)  # before result.json is written
        write_outputs(result, args.out, keep_all=args.keep_all)
    except InputError as exc:
        return _finish(args, ExitCode.USAGE, f"autoregister: error: {exc}")
    except (Cancelled, KeyboardInterrupt):
        if bar is not None:
            bar.close()
        return _finish(args, ExitCode.CANCELLED, "autoregister: cancelled; nothing was written")
    if not args.quiet and not args.progress_json:
        print(format_table(result))
        print(f"outputs in {args.out}")
    if not args.progress_json:
        for warning in result.warnings:  # also with --quiet: a far pose or a mirror image must be seen
            print(f"autoregister: warning: {warning}", file=sys.stderr)
    if result.best is None:
        return _finish(args, ExitCode.NO_RESULT, "autoregister: no preset succeeded; see result.json for the reasons")
    trust = result.trust
    if trust is not None and not args.progress_json:
        from .trust import headline

        print(f"autoregister: trust {headline(trust.to_dict())}; {trust.reason}", file=sys.stderr)
    if trust is not None and trust.light == "red":
        return _finish(args, ExitCode.UNTRUSTED, "autoregister: the result was written but its trust verdict is red: "
                                                 "check it before using it (exit 4)")
    return _finish(args, ExitCode.OK, None)


def _finish(args, code: ExitCode, message: str | None) -> int:
    if message:
        print(message, file=sys.stderr)
    if getattr(args, "progress_json", False):
        _json_progress({"event": "done", "exit_code": int(code), "message": message})
    return int(code)


def main(argv=None) -> int:
    """Entry point of the `autoregister` command."""
    os.environ.pop(ITK_AUTOLOAD, None)  # before ITK loads here or in any worker (see ITK_AUTOLOAD)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["tables"]:
            from .tables import tables_main

            return tables_main(argv[1:])
        return register_main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside the run (while starting up): still a clean 130
        print("autoregister: cancelled; nothing was written", file=sys.stderr)
        return int(ExitCode.CANCELLED)


if __name__ == "__main__":
    sys.exit(main())
