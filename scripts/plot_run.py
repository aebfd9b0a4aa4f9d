"""Draw a run's report: `python scripts/plot_run.py <run folder> [--out DIR]`.

Writes loss, learning rate, throughput/MFU, data mix and per-layer expert-load PNGs plus a
self-contained report.html (default: <run folder>/report/).
"""

from __future__ import annotations

import argparse

from dbrx_train.report.run_report import write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_folder", help="a run's save_folder (holds metrics.jsonl)")
    parser.add_argument("--out", help="output folder (default: <run folder>/report)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_folder, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for path in report.pngs:
        print(path)
    print(report.html)


if __name__ == "__main__":
    main()
