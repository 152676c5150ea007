"""Checkpoints: what the scripts write and read, in one place.

A checkpoint is a dict of tensors and plain data, loadable with
torch.load(weights_only=True); never a pickled module:

    {"kind": "encoder" | "mlm" | "ns" | "qa" | "glue" | "state",
     "model": state dict, "config": BertConfig as a dict, "vocab": list of words,
     "tokenizer": {"kind": "basic_english"} or {"kind": "wordpiece", "json": ...}, ...}

"encoder" holds a BertModel (mlm_bert.pt, ns_bert.pt), and "pooler", the state dict of
BERT's pooler (the dense layer on <cls>), when the model it came from trained one
(ns_bert.pt); "mlm", "ns", "qa" and "glue" hold a task model whose encoder weights sit
under `bert_model.` ("glue": a SequenceClassificationTask, with "labels", its label names
in id order, None for regression, "task", the GLUE task or None, and "bptt"); "state" is a
training state file (trainer.Trainer writes it) that also holds the optimizer, the RNG,
the flags and the path of its run's best model. A model a training run writes records
that run ("run": checks.run_record), so that no other run replaces it unasked. Every
config records the longest sequence the weights were trained on (BertConfig.trained_len).
A transformers BERT folder reads as the checkpoint of its heads
(bertkit/transformers_format.py).
"""

import os
from typing import NamedTuple

import torch

from bertkit import transformers_format
from bertkit.files import DataError, UserError, atomic_save, load_torch
from bertkit.text import tokenizer
from bertkit.training.distributed import unwrap
from model import BertConfig


def model_checkpoint(kind, model, config, vocab, state=None, **extra):
    """A weights_only-loadable dict: state dict (the model's, or `state`), architecture
    config, the tokenizer (its word list, and its state: the tokenizer.json content for
    WordPiece)."""
    state = unwrap(model).state_dict() if state is None else state
    return {"kind": kind, "model": state, "config": config.to_dict(),
            "vocab": list(vocab.itos), "tokenizer": vocab.state(), **extra}


def save_model(kind, model, config, vocab, path, state=None, **extra):
    atomic_save(model_checkpoint(kind, model, config, vocab, state, **extra), path)


def save_encoder(model, config, vocab, path, **extra):
    """The encoder of task model `model` as an "encoder" checkpoint (mlm_bert.pt,
    ns_bert.pt), with its pooler when it has one (NextSentenceTask's), so that a classifier
    fine-tuned from the file starts from the trained pooler, as transformers' does."""
    if hasattr(model, "pooler"):
        extra["pooler"] = model.pooler.state_dict()
    save_model("encoder", model.bert_model, config, vocab, path, **extra)


def load_checkpoint(path, flag):
    """torch.load(weights_only=True) with one-line errors naming the flag and the file; a
    transformers BERT folder is read by transformers_format.load_folder into the same dict."""
    if os.path.isdir(path):
        return transformers_format.load_folder(path, flag)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        ckpt = load_torch(path)
    except Exception as e:  # torch raises many kinds; its messages advise on unsafe loading
        raise UserError(f"{flag} {path}: not a checkpoint of this project (it does not load with "
                        f"torch.load(weights_only=True): {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= ckpt.keys():
        raise UserError(f"{flag} {path}: not a checkpoint of this project "
                        "(expected a dict with model, config and vocab)")
    check_fields(ckpt, flag, path)
    return ckpt


# The type of every field a checkpoint or state file may hold: data from disk, checked
# before any of it is used, so that a damaged or foreign file is one line, not a traceback.
FIELD_TYPES = {
    "kind": str, "model": dict, "config": dict, "vocab": list, "tokenizer": dict | None,
    "windowing": dict, "squad_v2": bool, "pooler": dict,
    "labels": list | None, "task": str | None, "bptt": int, "best_model": str | None,
    "pairs": bool, "run": dict,  # a classifier's input; the run that wrote a model
    # state files (trainer.Trainer.save_state, states.mark_finished)
    "args": dict, "script": str | None, "train_state": dict, "rng": list | dict,
    "optimizer": dict, "scheduler": dict, "scaler": dict, "metrics_rows": int, "finished": bool,
}


def check_fields(ckpt, flag, path):
    """A one-line UserError naming the file for the first field of the wrong type."""
    for name, expected in FIELD_TYPES.items():
        if name in ckpt and not isinstance(ckpt[name], expected):
            raise UserError(f"{flag} {path}: its {name!r} is a {type(ckpt[name]).__name__}, "
                            f"not a {_type_name(expected)} (not a checkpoint of this project)")
    for name in ("model", "pooler"):
        if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt.get(name, {}).items()):
            raise UserError(f"{flag} {path}: its {name!r} is not a state dict of named tensors")
    if not all(isinstance(label, str) for label in ckpt.get("labels") or []):
        raise UserError(f"{flag} {path}: its 'labels' is not a list of label names")
    if not all(isinstance(word, str) for word in ckpt["vocab"]):
        raise UserError(f"{flag} {path}: its 'vocab' is not a list of words")
    for name, value in ckpt.get("train_state", {}).items():
        if not _is_a(value, TRAIN_STATE_TYPES.get(name)):
            raise UserError(f"{flag} {path}: its train_state has {name} = {value!r:.60}, not a "
                            "field of this project's training state")


# trainer.TrainState's fields, as a state file holds them (tests/test_trainer.py checks
# that the two name the same fields).
TRAIN_STATE_TYPES = {"epoch": int, "step_in_epoch": int, "global_step": int,
                     "best_score": float | None, "train_loss_log": list, "val_loss_log": list,
                     "epoch_loss_sum": float, "evaluated_step": int, "budget": dict | None}


def _is_a(value, expected):
    """isinstance, where float admits int (never bool) and a list holds numbers."""
    if expected is None or isinstance(value, bool):
        return False
    if expected is list:
        return isinstance(value, list) and all(_is_a(x, float) for x in value)
    if expected is int:
        return isinstance(value, int)
    if expected == dict | None:
        return value is None or isinstance(value, dict)
    if value is None:
        return expected is not float  # float | None
    return isinstance(value, int | float)


def _type_name(expected):
    return " or ".join(t.__name__ for t in getattr(expected, "__args__", (expected,))
                       if t is not type(None))


def config_and_vocab(ckpt, flag, path):
    """The BertConfig and tokenizer of a loaded checkpoint, checked against each other."""
    try:
        config = BertConfig.from_dict(ckpt["config"])
        vocab = tokenizer.tokenizer_from_checkpoint(ckpt)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{flag} {path}: its config or vocab is unusable ({e})") from None
    if config.vocab_size != len(vocab):
        raise UserError(f"{flag} {path}: its vocab has {len(vocab)} words but its model "
                        f"{config.vocab_size}")
    return config, vocab


def encoder_state(ckpt, flag, path):
    """The BertModel weights inside any checkpoint: an encoder, or a task model around one."""
    state = ckpt["model"]
    if ckpt.get("kind") == "encoder":
        return state
    prefix = "bert_model."
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise UserError(f"{flag} {path}: holds no BERT encoder weights")
    return encoder


def load_into(module, state, flag, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{flag} {path}: weights do not fit the model ({detail})") from None


# The file of each kind of task model the scripts write, for the messages that ask for one.
TASK_MODELS = {"mlm": "full_mlm_model.pt, mlm_task.py's best model",
               "ns": "ns_model.pt, ns_task.py's best model",
               "qa": "qa_model.pt, qa_task.py's --save",
               "glue": "glue_model.pt, glue_task.py's --save"}


def refuse_state_file(ckpt, flag, path):
    """A training state file where a model is wanted: one line naming the better file,
    the best model of its run (state files record it; older ones: the usual names)."""
    if ckpt.get("kind") != "state":
        return
    best = ckpt.get("best_model")
    better = (f"its run's best model, {best}" if isinstance(best, str) else
              "a model (full_mlm_model.pt, ns_model.pt, qa_model.pt, glue_model.pt, mlm_bert.pt, "
              "ns_bert.pt)")
    raise UserError(f"{flag} {path}: a training state file (what --checkpoint resumes); "
                    f"give {better}")


class Start(NamedTuple):
    """What a task model starts from (starting_weights): `part` "task" (the whole model,
    `state`) or "encoder" (`state` the encoder's; `pooler` the pretrained pooler's or None);
    `labels`, the label names of a whole classifier ("glue")."""

    part: str
    state: dict
    pooler: dict | None = None
    labels: list | None = None


def starting_weights(ckpt, kind, path, evaluate_only=False):
    """What a task model of `kind` starts from in a loaded --bert-model checkpoint (a
    Start): the whole model ("task") when the checkpoint is one of that kind (a fine-tuned
    model, or a transformers folder with that head, continues with its head), else its
    encoder ("encoder") under a new head, with the checkpoint's pooler where it has one
    (pooler_state); --evaluate-only refuses a new head. Called before any long work, so
    that a checkpoint without an encoder is refused at once."""
    refuse_state_file(ckpt, "--bert-model", path)
    if ckpt.get("kind") == kind:
        return Start("task", ckpt["model"], pooler_state(ckpt), labels=ckpt.get("labels"))
    if evaluate_only:
        wanted = TASK_MODELS.get(kind, f"a {kind} model")
        raise UserError(f"--evaluate-only: --bert-model {path} is a checkpoint of kind "
                        f"{ckpt.get('kind')!r}, without the {kind} head to evaluate; give "
                        f"a model with it ({wanted})")
    return Start("encoder", encoder_state(ckpt, "--bert-model", path), pooler_state(ckpt))


# Where a task model keeps BERT's pooler (the dense layer before the tanh on <cls>).
POOLER_PREFIXES = {"ns": "linear_layer.", "glue": "pooler."}


def pooler_state(ckpt):
    """The state dict of the pretrained pooler in a checkpoint, or None: an encoder's
    "pooler" (ns_bert.pt; a transformers folder's, which the import keeps), a next-sentence
    model's linear_layer (ns_model.pt), a classifier's pooler (glue_model.pt). MLM
    pretraining trains none."""
    if "pooler" in ckpt:
        return ckpt["pooler"]
    prefix = POOLER_PREFIXES.get(ckpt.get("kind"))
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)} if prefix else {}
    return state or None


def encoder_start(start):
    """The encoder and pooler of a whole task model's Start: for a new head on them."""
    if start.part == "encoder":
        return start
    encoder = {k[len("bert_model."):]: v for k, v in start.state.items() if k.startswith("bert_model.")}
    return Start("encoder", encoder, pooler_state({"kind": "glue", "model": start.state}))


def task_model(task_class, config, weights, path, device, **head):
    """A task model (MLMTask, NextSentenceTask, QuestionAnswerTask,
    SequenceClassificationTask with its `head` arguments) with the starting_weights of
    --bert-model `path`; a head with a pooler starts from the pretrained one when there is
    one."""
    model = task_class(config, **head)
    if weights is None:  # --from-scratch: the model's own fresh weights
        pass
    elif weights.part == "task":
        load_into(model, whole_state(model, weights.state, weights.pooler), "--bert-model", path)
    else:
        load_into(model.bert_model, weights.state, "--bert-model", path)
        if weights.pooler is not None and hasattr(model, "pooler"):
            load_into(model.pooler, weights.pooler, "--bert-model", path)
    return model.to(device)


def whole_state(model, state, pooler):
    """A saved model's `state` as `model` loads it: a PreTrainingTask's file holds the MLM
    model and the pooler apart (its state_with joins them); any other model's as it is."""
    return model.state_with(state, pooler) if hasattr(model, "state_with") else state


def load_task_model(task_class, kind, path, flag, what):
    """(model, vocab, checkpoint) of a task model of `kind`, e.g. qa_model.pt; `what` says
    what it is and which script writes it, for the error message."""
    ckpt = load_checkpoint(path, flag)
    refuse_state_file(ckpt, flag, path)
    if ckpt.get("kind") != kind:
        raise UserError(f"{flag} {path}: a {ckpt.get('kind', 'unknown')} checkpoint, not {what}")
    config, vocab = config_and_vocab(ckpt, flag, path)
    model = task_class(config)
    load_into(model, ckpt["model"], flag, path)
    return model, vocab, ckpt


def save_vocab_copy(vocab, path, log):
    """Write a checkpoint's vocab to --save-vocab unless that file already holds it."""
    try:
        saved = tokenizer.load_vocab(path)[0]
        if saved.itos == vocab.itos and saved.state() == vocab.state():
            return
    except (FileNotFoundError, DataError):
        pass
    tokenizer.save_vocab(vocab, path)
    log(f"wrote the vocab of {len(vocab)} words to {path}")
