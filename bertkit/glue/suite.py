"""Several GLUE tasks from one command: glue_task.py --task RTE STS-B MRPC, or --task all
(GLUE's nine: CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI). Each task is the run that
glue_task.py --task T --output-dir <output-dir>/<T> makes (<T>-scratch with --from-scratch),
one after the other in this process, every task's flags checked before the first trains;
then the GLUE table of <output-dir> (results.py). A single --task is today's run, untouched.

With --checkpoint auto a stopped command, given again, skips the tasks that finished and
resumes the one that was stopped.
"""

import argparse
import json
import os
import sys
import time

from bertkit import flags, mains
from bertkit.files import UserError, atomic_write_text
from bertkit.glue import results
from bertkit.glue import tasks as glue
from bertkit.training import distributed

ALL = "all"
# Flags about one task's own files, or --predict's: with several tasks, an error.
ONE_TASK_FLAGS = ("train_file", "dev_file", "test_file", "test_predictions", "text_columns",
                  "label_column", "regression", "predict", "model", "sentence", "sentence2")


class TaskNames(argparse.Action):
    """--task A [B ...]: one task name is kept as given, a string (as a run's flags and its
    state file hold it); several, or all, a list, that run() runs one after another."""

    saved_type = str  # the --task of a state file (flags.check_saved_flags): one task

    def __call__(self, parser, namespace, values, option_string=None):
        one = len(values) == 1 and values[0].lower() != ALL
        setattr(namespace, self.dest, values[0] if one else list(values))


def task_names(given):
    """GLUE's names of the tasks `given` (--task's list), in the order given; all: the nine."""
    if any(name.lower() == ALL for name in given):
        if len(given) > 1:
            raise UserError(f"--task {' '.join(given)}: all is every GLUE task; give it alone")
        return list(glue.TASKS)
    names = [glue.task_by_name(name).name for name in given]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"--task {' '.join(given)}: {', '.join(twice)} named twice")
    return names


def check_flags(parser, args, argv):
    """The flags that cannot go with several tasks: one line naming the first."""
    given = flags.explicit_flags(parser, argv)
    # --tensorboard is an output flag too, and may be given without DIR: below.
    for dest in (*ONE_TASK_FLAGS, *(f for f in flags.OUTPUT_FLAGS if f != "tensorboard")):
        if dest in given:
            option = flags.flag_name(parser, dest)
            why = ("each task writes its own, in <output-dir>/<TASK>/; give --output-dir"
                   if dest in flags.OUTPUT_FLAGS else "it is about one task's files or model")
            raise UserError(f"{option} with several tasks (--task {' '.join(args.task)}): {why}")
    if "tensorboard" in given and args.tensorboard != flags.TENSORBOARD_IN_OUTPUT_DIR:
        raise UserError(f"--tensorboard {args.tensorboard} with several tasks: give --tensorboard "
                        "without DIR (each task's in <output-dir>/<TASK>/tensorboard)")
    if args.checkpoint not in ("None", "auto"):
        raise UserError(f"--checkpoint {args.checkpoint} with several tasks: a state file is "
                        "one task's; --checkpoint auto resumes each task in its folder")


def folder_of(args, name):
    scratch = bool(getattr(args, "from_scratch", False))  # glue_task.py --from-scratch
    return os.path.join(args.output_dir, name + (results.SCRATCH_SUFFIX if scratch else ""))


def task_runs(parser, args, argv):
    """[(task, folder, its parsed flags)], each parsed as glue_task.py --task T --output-dir
    FOLDER (the last of a flag wins); None for a task --checkpoint auto found finished."""
    runs = []
    for name in task_names(args.task):
        folder = folder_of(args, name)
        try:
            parsed = flags.parse_args(parser, [*argv, "--task", name, "--output-dir", folder])
        except SystemExit as e:
            if e.code not in (0, None):
                raise
            parsed = None  # --checkpoint auto: this task finished; its line said so
        runs.append((name, folder, parsed))
    return runs


def run(parser, main, argv=None):
    """glue_task.py's start: with several tasks (or all) run each with `main` and write the
    GLUE table; returns False, having done nothing, for one task or none."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not isinstance(args.task, list):
        return False
    try:
        check_flags(parser, args, argv)
        runs = task_runs(parser, args, argv)  # every task's flags, before any work
    except UserError as e:
        parser.error(str(e))
    main_rank = distributed.launcher_rank() == 0
    try:
        for i, (name, folder, task_args) in enumerate(runs, 1):
            if main_rank:
                print(f"== {name} ({i} of {len(runs)}): --output-dir {folder}"
                      + ("" if task_args else ": finished before, nothing to do"), flush=True)
            if task_args is not None:
                run_task(main, task_args, name, folder, main_rank)
    finally:
        if main_rank and os.path.isdir(args.output_dir):
            try:
                results.write(args.output_dir)
            except UserError as e:  # no task finished
                print(e, flush=True)
    return True


def run_task(main, args, name, folder, main_rank):
    """One task's run; its wall time goes to <folder>/glue_run.json for the table (a
    resumed run's added to the time of the start it resumes)."""
    start, finished = time.time(), False
    try:
        mains.launch(main, args)
        finished = True
    finally:
        if main_rank and os.path.isdir(folder):
            path = os.path.join(folder, results.RUN_RECORD)
            before = results.read_json(path)
            resumed = args.checkpoint != "None" and before.get("finished") is False
            seconds = time.time() - start + (before.get("seconds", 0) if resumed else 0)
            record = {"task": name, "from_scratch": bool(getattr(args, "from_scratch", False)),
                      "seconds": round(seconds, 3), "finished": finished}
            atomic_write_text(path, json.dumps(record) + "\n")
