"""Sentence pairs to labels, as bertkit/squad/answers.py is windows to answers: the loss of a sequence
classifier, scoring examples in order of length on every rank, GLUE's metrics as the log
shows them, predictions, what a classifier starts from (start_head), and the classifier
that --predict and --model read.

The model is model.SequenceClassificationTask: one logit per label, or one output for a
regression task (STS-B, --regression), as transformers' BertForSequenceClassification.
"""

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import utils
from bertkit import checkpoint
from bertkit.files import UserError
from bertkit.glue import metrics as glue_metrics
from bertkit.glue import sentences
from bertkit.glue import tasks as glue
from bertkit.training import distributed, logs
from model import SequenceClassificationTask


def loss(logits, labels, reduction="mean"):
    """Cross-entropy over the labels, or for one output (regression) the squared error of
    the value, as BertForSequenceClassification computes them; in fp32."""
    logits = logits.float()
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def predictions(logits):
    """Each row's label id (the largest logit), or its value (regression)."""
    return logits[:, 0] if logits.size(1) == 1 else logits.argmax(-1)


def task_metrics(names, logits, labels):
    """GLUE's metrics `names` (glue_metrics, as the `evaluate` library names them), x100 as
    GLUE's leaderboard and the BERT paper report them (and this project its accuracies)."""
    scores = glue_metrics.compute(names, predictions(logits), labels)
    return {name: 100 * value for name, value in scores.items()}


###############################################################################
# Scoring
###############################################################################


@dataclass
class Rows:
    """A file's examples as model inputs: its encoded rows, its label ids (or values) as a
    tensor, None when the file is unlabeled."""

    examples: glue.Examples
    encoded: sentences.Encoded
    labels: torch.Tensor | None

    @classmethod
    def of(cls, examples, vocab, max_len, labels):
        """`labels`: the label names of a classifier (ids in their order), or None for a
        regression task."""
        encoded = sentences.encode(examples.texts_a, examples.texts_b, vocab, max_len)
        if examples.labels is None:
            return cls(examples, encoded, None)
        if labels is None:
            return cls(examples, encoded, torch.tensor(examples.labels, dtype=torch.float32))
        return cls(examples, encoded, torch.tensor(glue.label_ids(examples, labels)))


@torch.no_grad()
def score(model, rows, pad_id, batch_size, device, dtype="fp32", info=None, subset=None):
    """(logits, loss sum) of `rows` (a Rows; `subset`: a tensor of row indices, default
    all): logits (n, outputs) in fp32 on the CPU in the order of the subset, the loss sum
    None for an unlabeled file. Rows go in order of length, each batch padded to its
    longest row; each rank scores every world_size-th batch and the results are summed
    over the ranks, so that every rank holds all of them."""
    info = info or distributed.DistInfo()
    subset = torch.arange(len(rows.encoded)) if subset is None else subset
    position = torch.empty(len(rows.encoded), dtype=torch.long)
    position[subset] = torch.arange(len(subset))
    order = sentences.length_order(rows.encoded, subset)
    n_outputs = model.classifier.out_features
    # Each row's logits and loss, in one tensor, so one collective gathers them all.
    total = torch.zeros(len(subset), n_outputs + 1, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    batches = order.split(batch_size)
    for i in logs.progress(range(info.rank, len(batches), info.world_size), unit="batch",
                           desc="evaluating"):
        batch = utils.to_device(sentences.pair_batch(rows.encoded, rows.labels, pad_id, i,
                                                     batches[i]), device)
        with utils.autocast(device, dtype):
            logits = model(batch["inputs"], batch["token_types"], batch["padding_mask"]).float()
        where = position[batches[i]].to(device)
        total[where, :n_outputs] = logits.double()
        if rows.labels is not None:
            total[where, n_outputs] = loss(logits, batch["labels"], reduction="none").double()
    model.train(was_training)
    distributed.all_reduce_sum(total, info)
    total = total.cpu()
    loss_sum = float(total[:, n_outputs].sum()) if rows.labels is not None else None
    return total[:, :n_outputs].float(), loss_sum


def evaluate(model, rows, metric_names, pad_id, batch_size, device, dtype="fp32", info=None,
             subset=None):
    """({"loss", each metric, "examples"}, logits) of a labeled file (`subset` of its rows,
    default all)."""
    logits, loss_sum = score(model, rows, pad_id, batch_size, device, dtype, info, subset)
    labels = rows.labels if subset is None else rows.labels[subset]
    return {"loss": loss_sum / len(labels), **task_metrics(metric_names, logits, labels),
            "examples": len(labels)}, logits


def write_predictions(path, rows, logits, labels):
    """GLUE's submission layout (glue.write_predictions): every row of the file, in order."""
    glue.write_predictions(path, rows.examples.indices, predictions(logits), labels)


###############################################################################
# The classifier --predict and --model read
###############################################################################


@dataclass
class Classifier:
    model: SequenceClassificationTask
    vocab: object
    labels: tuple | None  # label names in id order; None: regression
    task: glue.GlueTask | None  # the GLUE task it was fine-tuned on, if one
    bptt: int | None  # the --bptt it was fine-tuned with (None: a transformers folder)
    pairs: bool | None = None  # trained on sentence pairs (None: not known)


def start_head(weights, labels, path, log):
    """What a classifier of `labels` (names, or None for regression) starts from, a
    checkpoint.Start, said in one line: the whole model of --bert-model `path` when it is a
    classifier of the same labels; else its encoder, its pooler where it has one, and a new
    classifier."""
    if weights.part == "task":
        if weights.labels == (None if labels is None else list(labels)):
            log(f"head: {path}'s pooler and classifier (a classifier of the same labels)")
            return weights
        weights = checkpoint.encoder_start(weights)
    n = "one output (regression)" if labels is None else f"{len(labels)} labels"
    pooler = (f"BERT's pooler from {path}" if weights.pooler is not None else
              f"a new pooler ({path} has none: masked-LM pretraining trains no pooler, "
              "ns_task.py does)")
    log(f"head: {pooler}, a new classifier of {n}")
    return weights


def load_classifier(path, flag="--model", task=None):
    """A fine-tuned classifier: glue_model.pt, or a transformers
    BertForSequenceClassification folder. `task`: a GlueTask given on the command line, whose
    label names stand in for transformers' defaults (LABEL_0, ...), as run_glue.py reads
    such a model, and must otherwise be the model's."""
    ckpt = checkpoint.load_checkpoint(path, flag)
    if ckpt.get("kind") != "glue":
        raise UserError(f"{flag} {path}: not a sequence classifier but a checkpoint of kind "
                        f"{ckpt.get('kind')!r} (glue_task.py writes one, glue_model.pt; or give a "
                        "transformers BertForSequenceClassification folder)")
    config, vocab = checkpoint.config_and_vocab(ckpt, flag, path)
    labels = ckpt.get("labels")
    model = SequenceClassificationTask(config, 1 if labels is None else len(labels))
    checkpoint.load_into(model, ckpt["model"], flag, path)
    saved_task = _glue_task(ckpt.get("task"))
    task = task or saved_task
    if task is not None and labels is not None and task.labels is not None:
        defaults = [f"LABEL_{i}" for i in range(len(labels))]
        if labels == defaults and len(labels) == len(task.labels):
            labels = list(task.labels)
        elif tuple(labels) != task.labels:
            raise UserError(f"{flag} {path}: its labels are {', '.join(labels)}, not "
                            f"{task.name}'s ({', '.join(task.labels)})")
    if task is not None and (labels is None) != task.is_regression:
        raise UserError(f"{flag} {path}: a {'regression' if labels is None else 'classification'}"
                        f" model, but {task.name} is a "
                        f"{'regression' if task.is_regression else 'classification'} task")
    pairs = ckpt.get("pairs")  # its task's layout where the checkpoint does not say
    if pairs is None and task is not None and task.train_layout is not None:
        pairs = task.train_layout.text_b is not None
    return Classifier(model, vocab, None if labels is None else tuple(labels), task,
                      ckpt.get("bptt"), pairs)


def _glue_task(name):
    """The GlueTask a checkpoint names (glue_task.py saves GLUE's spelling; run_glue.py
    writes transformers', e.g. "rte"), or None for another name or none."""
    try:
        return glue.task_by_name(name) if name else None
    except UserError:
        return None


def check_pair(found, path, pair):
    """A sentence alone for a model trained on pairs (RTE, STS-B), or a pair for one trained
    on single sentences (SST-2, CoLA): one line saying which (nothing when not known)."""
    if found.pairs is not None and found.pairs != pair:
        trained = ("sentence pairs" if found.pairs else "single sentences") + (
            f" ({found.task.name})" if found.task else "")
        raise UserError(f"--model {path} was trained on {trained}: "
                        + ("give --sentence2 too" if found.pairs else "leave --sentence2 out"))


def classify(found, sentence, sentence2, max_len, device, dtype="fp32"):
    """The JSON line --predict prints for one text (pair) and a Classifier `found`: the
    label and every label's probability, or the predicted value."""
    pair = None if sentence2 is None else [sentence2]
    rows = Rows.of(glue.Examples("--sentence", [sentence], pair, None, ["0"]), found.vocab,
                   max_len, None)
    row = score(found.model, rows, found.vocab.pad_id, 1, device, dtype)[0][0]
    if found.labels is None:
        return json.dumps({"prediction": round(float(row[0]), 6)})
    probabilities = row.softmax(-1).tolist()
    return json.dumps({"label": found.labels[int(row.argmax())],
                       "probabilities": {label: round(p, 6) for label, p in
                                         zip(found.labels, probabilities)}})
