"""What the task scripts' main functions share, from their parsed flags: how the ranks start
(launch), the first steps of every main (start: its log, device and seed), the outputs of
the pretraining scripts (encoder_outputs), and the main of qa_task.py and glue_task.py
(fine_tune). With bertkit/flags.py, the one place below the
scripts that reads their argparse Namespace: it hands the library settings and values.
"""

import functools

import torch

import utils
from bertkit import flags, presets, recipes
from bertkit.training import distributed, logs, trainer


def launch(main, args):
    """main(args, info) on every rank of the run, started as its launch flags say
    (distributed.Launch: --parallel, --world_size, --device, --no-progress)."""
    distributed.launch(functools.partial(main, args), flags.settings(distributed.Launch, args))


def setup_device(args, info):
    """The rank's device (utils.setup_device), and the flag whose default depends on it
    resolved in `args`: --compile on for CUDA."""
    device = utils.setup_device(args.device, args.dtype, info)
    if getattr(args, "compile", False) is None:
        args.compile = device.type == "cuda"
    return device


def start(args, info):
    """(log, device) of a task script's main, --dtype auto resolved, the seed set: its first
    steps."""
    log = logs.make_logger(info)
    device = setup_device(args, info)
    presets.resolve_precision(args, device, log)
    torch.manual_seed(args.seed)
    return log, device


def encoder_outputs(args, best_model, loss_log):
    """{flag: (path, what)} of the files mlm_task.py and ns_task.py write besides the
    Trainer's: the encoder (--save), the best model and the loss log (`best_model`,
    `loss_log`: their names in --output-dir), the vocab copy (--save-vocab)."""
    return {"--save": (args.save, "encoder"),
            "the best model": (flags.in_output_dir(args, best_model), "best model"),
            "the loss log": (flags.in_output_dir(args, loss_log), "losses"),
            "--save-vocab": (args.save_vocab, "vocab")}


def fine_tune(args, info, kind, check_paths, predict, make_task):
    """The main of qa_task.py and glue_task.py (`kind`: "qa", "glue"). --predict: the
    script's check_paths(args, info, None), which returns what it loaded to check (the
    classifier whose task names glue_task.py's outputs; None), then rank 0's
    predict(args, checked, device, log). Otherwise a fine-tuning of --bert-model:
    --recipe's global batch split over the processes, check_paths(args, info,
    train_config) before any work, then make_task(args, weights, config, vocab, info,
    device, log) -> (task, model), which trainer.run trains, tests and writes."""
    log, device = start(args, info)
    train_config = None
    if not args.predict:
        recipes.split_global_batch(args, info.world_size)
        train_config = flags.train_config(args)
    checked = check_paths(args, info, train_config)
    if args.predict:
        if info.is_main:
            predict(args, checked, device, log)
        return
    weights, config, vocab = flags.fine_tuning_start(args, info, log, kind)
    task, model = make_task(args, weights, config, vocab, info, device, log)
    trainer.run(task, model, train_config, info, device, log, start=presets.start_text(args),
                flags=vars(args))
