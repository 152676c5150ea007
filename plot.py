"""Plot a run's metrics log (--metrics-file) to a PNG: training loss, learning rate,
throughput, and the validation metrics at each evaluation, against optimizer steps.

    python plot.py mlm_metrics.jsonl                 # -> mlm_metrics.png
    python plot.py mlm_metrics.jsonl -o run.png
    python plot.py --glue-table glue                 # -> glue/glue_results.md, .csv, .png

Needs matplotlib (pip install matplotlib); training does not. --glue-table: the GLUE table
of a folder of glue_task.py runs (bertkit/glue/results.py; its bar plot needs matplotlib).
"""

import argparse
import json
import sys
from pathlib import Path


def fail(message):
    """One line on stderr and exit code 2, as the training scripts report bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_rows(path):
    """The JSON objects of a metrics log, one per line (blank lines skipped); anything else
    (a checkpoint given by mistake, say) is one line naming the file."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        fail(f"{path} line {number} is not JSON: not a metrics log")
                    if not isinstance(row, dict) or not isinstance(row.get("step"), int | float):
                        fail(f"{path} line {number} is not a row of a metrics log (a JSON "
                             "object with its step)")
                    rows.append(row)
    except UnicodeDecodeError:
        fail(f"{path}: not text (a checkpoint?): give a metrics log, e.g. mlm_metrics.jsonl")
    except OSError as e:
        fail(f"{path}: cannot read it ({e.strerror or e})")
    return rows


def curves(rows):
    """{panel title: {series name: ([steps], [values])}}: training rows (those with a
    loss) by quantity, evaluation rows (the others) all in one panel per quantity."""
    panels = {}
    for row in rows:
        for name, value in row.items():
            if name in ("step", "epoch") or not isinstance(value, (int, float)):
                continue
            # valid_loss and test_loss share the panel "loss" with the training loss.
            title = name.split("_", 1)[1] if name.startswith(("valid_", "test_")) else name
            steps, values = panels.setdefault(title, {}).setdefault(name, ([], []))
            steps.append(row["step"])
            values.append(value)
    return panels


def plot(rows, out):
    fig = figure(rows)
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        fail(f"-o {out}: cannot write it ({e.strerror or e})")
    print(f"wrote {out}")


def figure(rows):
    """The figure of a metrics log's rows: a panel per quantity."""
    try:
        import matplotlib
    except ImportError:
        fail("plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = curves(rows)
    if not panels:
        fail("no metrics to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for name, (steps, values) in series.items():
            ax.plot(steps, values, label=name, **series_style(name, len(steps)))
        if title in ("loss", "ppl") and all(v > 0 for _, vs in series.values() for v in vs):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain_log_formatter())
            ax.yaxis.set_minor_formatter(plain_log_formatter(labelOnlyBase=False))
        ax.set_ylabel(title)
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def series_style(name, n_points):
    """Evaluations are few points: markers show where each was. The test is one point,
    often at the step of the last validation: a larger hollow marker drawn below it, so
    that a single valid point stays visible inside it."""
    if name.startswith("test_"):
        return {"marker": "o", "markersize": 11, "markerfacecolor": "none", "linestyle": "none",
                "zorder": 2}
    if name.startswith("valid_"):
        return {"marker": "o", "zorder": 3}
    return {"marker": "o" if n_points < 50 else None}


def plain_log_formatter(**kwargs):
    """matplotlib's choice of which log-axis ticks get a label, each written as a plain
    number ("9", "698.4") rather than 9x10^0."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(**kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, nargs="?",
                        help="a metrics log: mlm_metrics.jsonl, ...")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="the PNG to write (default: the log's name with .png)")
    parser.add_argument("--glue-table", type=Path, default=None, metavar="FOLDER",
                        help="instead: the GLUE table of the glue_task.py runs in FOLDER and "
                             "its subfolders (pretrained beside --from-scratch runs, GLUE's "
                             "average), written as FOLDER/glue_results.md, .csv and .png")
    args = parser.parse_args(argv)
    if args.glue_table is not None:
        glue_table(args)
        return
    if args.metrics is None:
        fail("give a metrics log, or --glue-table FOLDER")
    if not args.metrics.is_file():
        fail(f"{args.metrics}: no such file")
    out = args.output or args.metrics.with_suffix(".png")
    if out.resolve() == args.metrics.resolve():
        fail(f"-o {out} is the metrics log itself: writing it would overwrite that input")
    if out.is_dir():
        fail(f"-o {out}: is a folder; give a file name")
    plot(read_rows(args.metrics), out)


def glue_table(args):
    if args.metrics is not None or args.output is not None:
        fail("--glue-table FOLDER writes FOLDER/glue_results.*: give no metrics log or -o")
    if not args.glue_table.is_dir():
        fail(f"--glue-table {args.glue_table}: no such folder")
    from bertkit.files import UserError
    from bertkit.glue import results

    try:
        results.write(args.glue_table)
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
