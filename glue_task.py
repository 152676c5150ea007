"""Fine-tuning a pretrained BERT encoder on a GLUE task, or on your own sentence (pair)
classification or regression files.

    python glue_task.py --bert-model ns_bert.pt --task RTE            # glue_model.pt, dev score
    python glue_task.py --bert-model ns_bert.pt --task MNLI --recipe bert
    python glue_task.py --bert-model ns_bert.pt --task all --output-dir glue  # each, then the table
    python glue_task.py --bert-model mlm_bert.pt --train-file my.tsv --dev-file my_dev.tsv \\
        --text-columns review --label-column stars                   # your own data
    python glue_task.py --predict --model glue_model.pt --sentence "..." [--sentence2 "..."]

The script is the flags, the task the Trainer runs, and main: examples.py reads the files
(glue.py: GLUE's), sentences.py makes `<cls> a <sep> b <sep>` rows, classifier.py scores
them (glue_metrics.py). GLUE's test labels are hidden: the run's final "test" scores every
dev example with the best model (the `test_*` rows of the metrics log, End of training),
whose predictions are the --predictions file.
"""

import functools

import bertkit.cpu_threads  # noqa: F401 (OpenMP's wait policy, before torch loads)

import torch

import data
from bertkit import checkpoint, checks, flags, mains, presets, recipes
from bertkit.files import UserError
from bertkit.glue import classifier, examples, sentences, suite
from bertkit.glue import tasks as glue
from bertkit.glue.classifier import Rows
from bertkit.training import distributed, logs
from model import SequenceClassificationTask

BPTT = 128


def get_parser():
    parser = flags.ArgumentParser(prog="glue_task.py", description="BERT fine-tuning on GLUE "
                                  "and other sentence (pair) classification or regression")
    parser.add_argument("--bert-model", type=str, default="ns_bert.pt",
                        help="pretrained encoder (mlm_bert.pt, ns_bert.pt, a transformers BERT "
                             "folder, or any checkpoint holding one); its pooler is kept where "
                             "it has one (default ns_bert.pt)")
    parser.add_argument("--task", type=str, nargs="+", action=suite.TaskNames, default=None,
                        help=f"a GLUE task: {', '.join(glue.TASKS)} (any case; sst2, stsb, ... "
                             "too), read from <data-dir>/glue/<TASK>/ and downloaded when "
                             "absent; several, or all (those nine), run one after another, each "
                             "in <output-dir>/<TASK>/, then the table <output-dir>/glue_results"
                             ".md, .csv (default none: your own --train-file and --dev-file)")
    for split in ("train", "dev"):
        parser.add_argument(f"--{split}-file", type=str, default=None,
                            help=f"{split} examples, .tsv, .csv or .jsonl (default: the "
                                 f"--task's {split} file)")
    parser.add_argument("--test-file", type=str, nargs="+", default=None, metavar="FILE",
                        help="unlabeled examples to predict with the best model, e.g. GLUE's "
                             "test.tsv (default none)")
    parser.add_argument("--text-columns", type=str, nargs="+", default=None, metavar="COLUMN",
                        help="your own files: the text column, or the two of a pair (default: "
                             "the --task's)")
    parser.add_argument("--label-column", type=str, default="label",
                        help="your own files: the label column (default label)")
    parser.add_argument("--regression", action="store_true",
                        help="your own files: the labels are numbers, predicted by one output "
                             "trained with the squared error (default off: classification)")
    parser.add_argument("--predictions", type=str, default="glue_predictions.tsv",
                        help="where to write the dev predictions, GLUE's submission layout "
                             "(MNLI's mismatched ones beside it, with _mm) "
                             "(default glue_predictions.tsv)")
    parser.add_argument("--test-predictions", type=str, nargs="+", default=None, metavar="FILE",
                        help="where to write the --test-file predictions, one file each "
                             "(default: the names GLUE's submission expects, e.g. RTE.tsv, "
                             "MNLI-m.tsv, MNLI-mm.tsv, AX.tsv; <name>_predictions.tsv for "
                             "your own files)")
    parser.add_argument("--predict", action="store_true",
                        help="no training: classify --sentence [--sentence2], or score "
                             "--dev-file and predict --test-file, with --model")
    parser.add_argument("--model", type=str, default=None,
                        help="fine-tuned classifier for --predict: glue_model.pt or a "
                             "transformers BertForSequenceClassification folder (default: "
                             "--save, glue_model.pt)")
    parser.add_argument("--sentence", type=str, default=None, help="--predict: the text")
    parser.add_argument("--sentence2", type=str, default=None,
                        help="--predict: the second text of a pair")
    recipes.add_recipe_flag(parser)
    flags.add_model_flags(parser)
    presets.add_fresh_model_flags(parser)
    # BERT's fine-tuning (recipes.RECIPES, "bert") without --recipe too, but the model's dropout.
    flags.add_common_flags(parser, lr=2e-5, clip=1.0, epochs=3, batch_size=32, bptt=BPTT,
                           seed=1234, log_interval=50, save="glue_model.pt",
                           state_file="glue_state.pt", optimizer="adamw", weight_decay=0.01,
                           schedule="linear", warmup=0.1)
    return parser


class Glue:
    """What the shared Trainer needs to know about sentence (pair) classification."""

    def __init__(self, args, vocab, config, splits, info, device, log):
        self.args, self.vocab, self.config, self.splits = args, vocab, config, splits
        self.info, self.device, self.log = info, device, log
        self.outputs = outputs(args, glue_task(args))  # every file it writes
        self.run = checks.run_record(vars(args))
        self.best_model_path = self.outputs["--save"][0]
        self.best_metric = (splits.task.main_metric, "max")
        self.name = splits.glue_task  # in its state files
        self.accuracy = logs.TrainingAccuracy(device)  # of the training examples, for the log
        encode = functools.partial(Rows.of, vocab=vocab, max_len=args.bptt, labels=splits.labels)
        self.train = encode(splits.train)
        self.dev = [encode(file) for file in splits.dev]
        self.test = [encode(file) for file in splits.test]
        cut = sum(rows.encoded.truncated for rows in (self.train, *self.dev, *self.test))
        if cut:
            log(f"{cut:,} examples are longer than --bptt {args.bptt} tokens: cut longest-first")
        if len(self.train.encoded) < info.world_size:
            raise UserError(f"{splits.train.path}: {len(self.train.encoded)} examples for "
                            f"{info.world_size} processes")
        # Validations score --eval-batches' sample of each dev file; the test scores all.
        self.valid_rows = [data.evaluation_order(len(rows.encoded), args.batch_size,
                                                 args.eval_batches) for rows in self.dev]
        self.scored = self.best_scored = None  # of the last validation, of the best model's

    def train_batches(self, epoch):
        # drop_last=False (as run_glue.py): every example is trained on; each rank gets the
        # same number of them, so the same number of steps.
        a = self.args
        order = data.epoch_order(len(self.train.encoded), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size, drop_last=False)
        # Each batch padded to its longest row; to --bptt under --compile (one shape).
        make_batch = functools.partial(sentences.pair_batch, self.train.encoded,
                                       self.train.labels, self.vocab.pad_id,
                                       seq_len=a.bptt if a.compile else None)
        return data.Batches(make_batch, order, a.batch_size)

    def loss(self, model, batch):
        logits = model(batch["inputs"], batch["token_types"], batch["padding_mask"])
        self.accuracy.add(logits, batch["labels"])  # a classifier's (not a regression's)
        return classifier.loss(logits, batch["labels"])

    def training_metrics(self, loss):
        return self.accuracy.read_and_reset()

    def evaluate(self, model, split):
        """Loss, the task's metrics and the examples scored, of each dev file (MNLI's
        mismatched one's with _mm): --eval-batches' sample in validations. The test is the
        best model's scores of every dev example, rank 0 writing their predictions and those
        of every --test-file; when the validation that chose the best model scored every dev
        example, its scores are the test's (the same model, the same examples)."""
        a, test = self.args, split == "test"
        if test and self.best_model_was_scored():
            scored = self.best_scored if self.info.is_main else self.scored
            self.log("test: the best model's scores of every dev example, from the "
                     "validation that chose it")
        else:
            scored = [classifier.evaluate(model, rows, self.splits.task.metrics,
                                          self.vocab.pad_id, a.batch_size, self.device, a.dtype,
                                          self.info, None if test else self.valid_rows[i])
                      for i, rows in enumerate(self.dev)]
        if not test:
            every = all(len(s) == len(r.encoded) for s, r in zip(self.valid_rows, self.dev))
            self.scored = scored if every else None
        metrics = {}
        for i, (scores, logits) in enumerate(scored):
            metrics.update({name + ("_mm" if i else ""): value for name, value in scores.items()})
            if test and self.info.is_main:
                classifier.write_predictions(self.outputs[examples.dev_flag(i)][0],
                                             self.dev[i], logits, self.splits.labels)
        for i, rows in enumerate(self.test if test else ()):
            logits, _ = classifier.score(model, rows, self.vocab.pad_id, a.batch_size,
                                         self.device, a.dtype, self.info)
            if self.info.is_main:
                classifier.write_predictions(self.outputs[examples.test_flag(i)][0], rows,
                                             logits, self.splits.labels)
        return metrics

    def best_model_was_scored(self):
        """Whether this run's best model was chosen by a validation of every dev example
        (rank 0 knows: save_best; a resumed run's best may be older than its scores)."""
        known = torch.tensor([float(self.best_scored is not None)], device=self.device)
        return bool(distributed.all_reduce_sum(known, self.info).item())

    def save_best(self, model):
        self.best_scored = self.scored
        labels = self.splits.labels
        checkpoint.save_model("glue", model, self.config, self.vocab, self.best_model_path,
                              labels=None if labels is None else list(labels),
                              task=self.splits.glue_task, bptt=self.args.bptt,
                              pairs=self.splits.train.texts_b is not None, run=self.run)

    def write_outputs(self, model):
        """Nothing more: --save holds the best model, the test wrote the predictions."""


def glue_task(args):
    return glue.task_by_name(args.task) if args.task else None


def outputs(args, task):
    """examples.run_files of the run's flags: every file it writes besides the Trainer's
    own; `task` names the --test-file predictions (--predict: the model's task)."""
    if args.predict and args.sentence is not None:
        return {}  # the answer is printed
    tests = examples.test_predictions_paths(args.test_predictions, args.test_file,
                                            args.output_dir, task)
    trains = () if args.predict else (
        args.save, flags.in_output_dir(args, "glue_loss.txt"), args.save_vocab)
    return examples.run_files(task, args.dev_file, args.predictions, tests, *trains)


def check_paths(args, info, train_config):
    """glue_task.py's inputs and outputs (see checks.prepare_run), before any work;
    `train_config`: the run's TrainConfig, None under --predict (check_predict)."""
    task = glue_task(args)
    if args.regression and task is not None and not task.is_regression:
        raise UserError(f"--regression: {task.name} is a classification task")
    inputs = {"--dev-file": args.dev_file,
              **{f"--test-file ({i + 1})": path for i, path in enumerate(args.test_file or ())}}
    if args.predict:
        return check_predict(args, info, task, inputs)
    checks.prepare_run(
        info, inputs={"--bert-model": args.bert_model, "--train-file": args.train_file, **inputs},
        outputs=checks.run_outputs(outputs(args, task), train_config), data_dir=args.data_dir,
        also_read=examples.task_files(task, args.data_dir), owner=checks.Owner.of(vars(args)))


def check_predict(args, info, task, inputs):
    """--predict's flags, its classifier (classifier.Classifier, returned), and the paths of
    the files it writes, which the model's task names: checked and locked before any work."""
    if args.sentence is None and not (args.dev_file or args.test_file):
        raise UserError("--predict needs --sentence [--sentence2], or a --dev-file or "
                        "--test-file to score")
    if args.sentence2 is not None and args.sentence is None:
        raise UserError("--sentence2 needs --sentence")
    path = args.model or args.save
    inputs = {"--model": path, **inputs}
    made_by = {"glue_model.pt": "python glue_task.py --bert-model ns_bert.pt --task "
                                f"{task.name if task else 'TASK'}"}
    checks.check_inputs(inputs, made_by)
    found = classifier.load_classifier(path, "--model", task)
    if args.sentence is not None:
        classifier.check_pair(found, path, args.sentence2 is not None)
    checks.prepare_run(info, inputs=inputs, outputs=outputs(args, found.task),
                       owner=checks.Owner.of(vars(args), trains=False), made_by=made_by)
    return found


def columns(args, regression=None):
    """Your own files' columns (examples.Columns), or None without --text-columns."""
    regression = args.regression if regression is None else regression
    return args.text_columns and examples.Columns(args.text_columns, args.label_column, regression)


def predict(args, found, device, log):
    """--predict: a sentence (pair)'s label and probabilities printed as a JSON line; or a
    labeled --dev-file scored and --test-files predicted, into the files check_predict checked."""
    path = args.model or args.save
    files = outputs(args, found.task)  # those check_predict checked
    bptt = found.bptt if found.bptt and args.bptt == BPTT else args.bptt
    flags.check_bptt(bptt, found.model.bert_model.config, path, logs.to_stderr)  # stdout: the answers
    model, vocab, labels, pad_id = found.model.to(device), found.vocab, found.labels, found.vocab.pad_id
    if args.sentence is not None:
        print(classifier.classify(found, args.sentence, args.sentence2, bptt, device, args.dtype))
        return
    if args.text_columns is None and found.task is None:
        raise UserError(f"--model {path} was not fine-tuned on a GLUE task: give --text-columns "
                        "(and --label-column) of your files, or --task")
    task, own = found.task or glue.own_task(labels), columns(args, labels is None)
    if args.dev_file:
        out = files["--predictions"][0]
        rows = Rows.of(examples.read_file(args.dev_file, "dev", task, own), vocab, bptt, labels)
        scores, logits = classifier.evaluate(model, rows, task.metrics, pad_id, args.batch_size,
                                             device, args.dtype)
        classifier.write_predictions(out, rows, logits, labels)
        log(f"wrote {out} | {logs.format_metrics('dev', scores)}")
    for i, test_path in enumerate(args.test_file or ()):
        out = files[examples.test_flag(i)][0]
        rows = Rows.of(examples.read_file(test_path, "test", task, own), vocab, bptt, labels)
        logits, _ = classifier.score(model, rows, pad_id, args.batch_size, device, args.dtype)
        classifier.write_predictions(out, rows, logits, labels)
        log(f"wrote {out}: {len(rows.encoded):,} predictions for {test_path}")


def start_task(args, weights, config, vocab, info, device, log):
    """(the GLUE task, the model) of a training run (mains.fine_tune)."""
    with distributed.main_rank_first(info):
        splits = examples.read_splits(glue_task(args), columns(args), args.train_file,
                                      args.dev_file, args.test_file, args.data_dir, log)
    task = Glue(args, vocab, config, splits, info, device, log)
    weights = weights and classifier.start_head(weights, splits.labels, args.bert_model, log)
    n_labels = 1 if splits.labels is None else len(splits.labels)
    return task, checkpoint.task_model(SequenceClassificationTask, config, weights,
                                       args.bert_model, device, n_labels=n_labels)


def main(args, info):
    mains.fine_tune(args, info, "glue", check_paths, predict, start_task)


if __name__ == "__main__":
    if not suite.run(get_parser(), main):  # --task with several tasks or all: each in turn
        mains.launch(main, flags.parse_args(get_parser()))
