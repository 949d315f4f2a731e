"""Command line: ``autoregister FIXED MOVING --out DIR`` (also ``python -m AutoRegisterLib``).

Exit codes (`events.ExitCode`): 0 a result was kept; 2 bad input or usage (one line on stderr, no
traceback); 3 no preset succeeded; 130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import sys

from .cli_common import Parser, ProgressBar  # noqa: F401  (ProgressBar: also imported from here)
from .errors import Cancelled, InputError
from .events import ExitCode, event_line

# Older names of the exit codes, for code that imported them from here.
EXIT_OK, EXIT_USAGE, EXIT_NO_RESULT, EXIT_CANCELLED = (ExitCode.OK, ExitCode.USAGE, ExitCode.NO_RESULT,
                                                       ExitCode.CANCELLED)
_Parser = Parser


def build_parser() -> Parser:
    """The argument parser of the register command."""
    p = Parser(prog="autoregister", description="One-click registration of MOVING onto FIXED.")
    p.add_argument("fixed", help="fixed (reference) image: NIfTI, NRRD, MHA or a DICOM folder")
    p.add_argument("moving", help="moving image, registered onto the fixed image")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--fixed-modality", help="T1, T2, FLAIR, PD, CT or MR (guessed when omitted)")
    p.add_argument("--moving-modality", help="T1, T2, FLAIR, PD, CT or MR (guessed when omitted)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--table", help="preset table JSON file")
    group.add_argument("--presets", help="comma-separated preset names to race instead of a table")
    p.add_argument("--keep-all", action="store_true", help="write every successful candidate's transform")
    p.add_argument("--jobs", type=int, help="parallel workers (default: one per core)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per preset (default 600)")
    p.add_argument("--memory-limit-mb", type=int,
                   help="cap each preset's worker at this much address space (default: no cap)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device for scoring")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("--progress-json", action="store_true",
                   help="write progress events as JSON lines on stdout (for the Slicer module)")
    return p


def _json_progress(event: dict) -> None:
    sys.stdout.write(event_line(event) + "\n")
    sys.stdout.flush()


def register_main(argv) -> int:
    """Run the register command; return the exit code."""
    args = build_parser().parse_args(argv)
    from .image import read_image
    from .report import check_output_dir, format_table, write_outputs

    try:
        if args.jobs is not None and args.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {args.jobs}")
        if args.timeout <= 0:
            raise InputError(f"--timeout must be positive, got {args.timeout}")
        if args.memory_limit_mb is not None and args.memory_limit_mb <= 0:
            raise InputError(f"--memory-limit-mb must be positive, got {args.memory_limit_mb}")
        check_output_dir(args.out)
        fixed = read_image(args.fixed)
        moving = read_image(args.moving)
        from .pipeline import auto_register

        bar = None
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
                device=args.device, progress=progress, memory_limit_mb=args.memory_limit_mb)
        finally:
            if bar is not None:
                bar.close()
        result.inputs.update(fixed=args.fixed, moving=args.moving)  # before result.json is written
        write_outputs(result, args.out, keep_all=args.keep_all)
    except InputError as exc:
        return _finish(args, ExitCode.USAGE, f"autoregister: error: {exc}")
    except (Cancelled, KeyboardInterrupt):
        return _finish(args, ExitCode.CANCELLED, "autoregister: cancelled; nothing was written")
    if not args.quiet and not args.progress_json:
        print(format_table(result))
        print(f"outputs in {args.out}")
    if result.best is None:
        return _finish(args, ExitCode.NO_RESULT, "autoregister: no preset succeeded; see result.json for the reasons")
    return _finish(args, ExitCode.OK, None)


def _finish(args, code: ExitCode, message: str | None) -> int:
    if message:
        print(message, file=sys.stderr)
    if getattr(args, "progress_json", False):
        _json_progress({"event": "done", "exit_code": int(code), "message": message})
    return int(code)


def main(argv=None) -> int:
    """Entry point of the `autoregister` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tables"]:
        from .tables import tables_main

        return tables_main(argv[1:])
    return register_main(argv)


if __name__ == "__main__":
    sys.exit(main())
