"""The end of a run: after Trainer.fit, the test of the best model, the writing of every
output and the "wrote" line listing them (finish; the list of every file a run writes is
checks.run_outputs, made before it starts); a stop by a signal, its line and exit code
(stopped).
"""

import os
import signal

from bertkit import checkpoint
from bertkit.training import distributed, logs, states


def finish(loop):
    """After `loop.fit()` (a trainer.Trainer): every rank tests the best model; rank 0 writes
    the task's files, the old example's loss log and the vocab copy, and lists every file
    written; then marks the state file finished."""
    task, log, st = loop.task, loop.log, loop.state
    if loop.state_files.continues != 0:  # resumed an older or another state, with nothing
        loop.save_state()  # to train: the final state goes to --state-file, to be marked there
    model = load_best(loop.model, task.best_model_path, loop.info)
    metrics = task.evaluate(model, "test")
    loop.run_log.evaluation("test", metrics, st, "End of training", rule="=")
    if not loop.info.is_main:
        return
    outputs = task.outputs
    logs.write_loss_log(outputs["the loss log"][0], st.train_loss_log, st.val_loss_log,
                        metrics["loss"], loss_log_settings(loop.flags, task.vocab))
    task.write_outputs(model)
    checkpoint.save_vocab_copy(task.vocab, outputs["--save-vocab"][0], log)
    loop.run_log.metrics.close()
    states.mark_finished(loop.config.state_file)  # --checkpoint auto: nothing left to do
    written = [f"{path} ({what})" for path, what in outputs.values()
               if path is not None and os.path.exists(path)
               and os.path.getmtime(path) >= loop.started]
    written += loop.state_files.files() + loop.run_log.metrics.files()
    log(f"wrote {', '.join(written)}")


def load_best(model, path, info):
    """After fit: every rank loads the best model rank 0 saved at `path` into `model`;
    returns the plain module (no DDP, no compile wrapper) for the final evaluation."""
    distributed.barrier(info)
    model = distributed.unwrap(model)
    best = checkpoint.load_checkpoint(path, "best model")
    state = checkpoint.whole_state(model, best["model"], best.get("pooler"))
    checkpoint.load_into(model, state, "best model", path)
    return model


def loss_log_settings(flags, vocab):
    """The run's flags, with the tokenizer and vocabulary size the model really has (the
    flags' own are defaults, or unused when --bert-model brings its tokenizer)."""
    kind, given = vocab.state()["kind"], flags.get("tokenizer")
    shown = kind if given in (None, kind) else f"{kind} ({given})"
    return {**flags, "tokenizer": shown, "vocab_size": len(vocab)}


def stopped(signum, step, config, info, device, log):
    """A run stopped by signal `signum` at optimizer `step`, its state file written: the
    line that says how to resume it, and its exit code (distributed.exit_code_after; every
    rank calls this)."""
    log(f"stopped by a signal ({signal.Signals(signum).name}) at step {step}; the state is "
        f"in {config.state_file}. Resume with: {logs.resume_command(config.state_file)} (or "
        "the command that started it, with --checkpoint auto)")
    return distributed.exit_code_after(signum, config.slurm_requeue, info, device, log)
