"""Compare the runs of a sweep: `python run_report.py multirun/<date>/<time>` (also outputs/, a SLURM sweep's
folder, or one run dir).

Prints a Markdown table, one row per run (the overrides that differ between runs, status, final and best val
loss, steps, tokens, tok/s, wall time; sorted by final val loss) and writes it as report.md and report.csv, with
report.png overlaying every run's val-loss curve, into the folder (or --out). It reads only the files runs write,
so it also reports a sweep that is still running.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python run_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a sweep folder (multirun/<date>/<time>), outputs/, or a run dir")
    parser.add_argument("--out", help="folder for report.md, report.csv and report.png (default: FOLDER)")
    parser.add_argument("--stale-minutes", type=float, default=60.0,
                        help="a run without an end line whose files were not written for this long is 'stalled' "
                             "(default: 60)")
    args = parser.parse_args(argv)
    from gpt2.errors import UserError
    from gpt2.report import sweep_report

    try:
        report = sweep_report(args.folder, args.out, stale_s=args.stale_minutes * 60)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(report.markdown, end="")
    print(f"{len(report.runs)} run(s); wrote {', '.join(str(p) for p in report.written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
