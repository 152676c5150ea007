"""Fine-tuning a pretrained BERT encoder on SQuAD v1.1 or v2.0 question answering.

    python qa_task.py --bert-model ns_bert.pt                    # qa_model.pt, predictions.json
    python metrics.py .data/squad/dev-v1.1.json predictions.json  # the official EM / F1
    python qa_task.py --predict --context "..." --question "..."  # an answer from qa_model.pt

The script is the flags, the task the Trainer runs, and main. SQuAD's files are read in
squad.py; windows.py cuts each question's context into overlapping windows of at most
--bptt tokens; answers.py scores every window and takes the best span over all windows of
a question, cut from the original context, so the official metric sees real answer text.

SQuAD v2.0 data (questions without an answer: an empty answers list) is recognized from
the files. Training points an unanswerable question at <cls> in every window; decoding
answers "" when the question's <cls> score (its no-answer score) beats the best span by
more than --null-threshold, and --na-probs gets that margin for the official v2.0 metric.
"""

import functools
import os
from dataclasses import asdict

import bertkit.cpu_threads  # noqa: F401 (OpenMP's wait policy, before torch loads)

import data
import metrics
from bertkit import checkpoint, checks, flags, mains, presets, recipes
from bertkit.files import UserError
from bertkit.squad import answers
from bertkit.squad import dataset as squad
from bertkit.squad.windows import Windowing, count_windows, make_windows, window_batch
from bertkit.training import distributed, logs
from model import QuestionAnswerTask


def get_parser():
    w = Windowing
    parser = flags.ArgumentParser(prog="qa_task.py", description="BERT question answering "
                                   "on SQuAD v1.1 and v2.0")
    parser.add_argument("--bert-model", type=str, default="ns_bert.pt",
                        help="pretrained encoder (mlm_bert.pt, ns_bert.pt, or any checkpoint "
                             "holding one); architecture and vocab come from it "
                             "(default ns_bert.pt)")
    parser.add_argument("--train-file", type=str, default=None,
                        help="SQuAD-layout JSON to train on (default "
                             "<data-dir>/squad/train-v1.1.json, downloaded when absent)")
    parser.add_argument("--dev-file", type=str, default=None,
                        help="SQuAD-layout JSON to evaluate on (default "
                             "<data-dir>/squad/dev-v1.1.json, downloaded when absent)")
    parser.add_argument("--doc-stride", type=int, default=w.doc_stride,
                        help="context tokens between the starts of consecutive windows; lowered "
                             "for long questions so that windows overlap by --max-answer-len "
                             f"tokens (default {w.doc_stride})")
    parser.add_argument("--max-query-len", type=int, default=w.max_query_len,
                        help=f"question tokens kept, the rest cut (default {w.max_query_len})")
    parser.add_argument("--max-answer-len", type=int, default=w.max_answer_len,
                        help=f"longest answer predicted, in tokens (default {w.max_answer_len})")
    parser.add_argument("--predictions", type=str, default="predictions.json",
                        help="where to write {question id: answer} for every dev question, the "
                             "official format (default predictions.json; --predict "
                             "--predict-file FILE: FILE's name with .predictions.json)")
    parser.add_argument("--predict", action="store_true",
                        help="no training: answer --question about --context (or the questions "
                             "of --predict-file) with --qa-model")
    parser.add_argument("--qa-model", type=str, default=None,
                        help="fine-tuned model for --predict (default: --save, qa_model.pt)")
    parser.add_argument("--context", type=str, default=None, help="--predict: the context text")
    parser.add_argument("--question", type=str, default=None, help="--predict: the question")
    parser.add_argument("--predict-file", type=str, default=None,
                        help="--predict: a JSON list of {\"context\", \"question\"[, \"id\"]} "
                             "objects (prints one JSON line each), or a SQuAD-layout file "
                             "(writes --predictions and prints EM / F1)")
    parser.add_argument("--null-threshold", type=float, default=answers.DEFAULT_NULL_THRESHOLD,
                        help="models trained on SQuAD v2.0 data: answer \"\" (no answer) when "
                             "the question's no-answer score minus its best span's score, both "
                             "start + end logits, is above this; higher answers more questions "
                             f"(default {answers.DEFAULT_NULL_THRESHOLD})")
    parser.add_argument("--na-probs", type=str, default=None,
                        help="SQuAD v2.0 dev data: where to write {question id: no-answer score "
                             "- best span score} for every question (logits, as Google BERT's "
                             "null_odds.json), the official script's --na-prob-file (default "
                             "na_probs.json in the folder of --predictions; --predict "
                             "--predict-file FILE: FILE's name with .na_probs.json)")
    parser.add_argument("--qa-gelu", action="store_true",
                        help="the old example's QA head: a GELU on the encoder output before the "
                             "span layer (default off: BERT's head, one linear layer)")
    parser.add_argument("--span-loss", type=str, default="masked", choices=answers.SPAN_LOSSES,
                        help="masked: padding is left out of the start/end softmax and batches "
                             "are cut to their longest window; bert: every window is padded to "
                             "--bptt and its padding counts in the softmax, as in BERT and "
                             "transformers (default masked)")
    recipes.add_recipe_flag(parser)
    flags.add_model_flags(parser)
    presets.add_fresh_model_flags(parser)
    flags.add_common_flags(parser, lr=5.0, clip=0.1, epochs=2, batch_size=72, bptt=w.bptt,
                           seed=21192391, log_interval=200, save="qa_model.pt",
                           state_file="qa_state.pt")
    return parser


class QA:
    """What the shared Trainer needs to know about SQuAD fine-tuning."""

    best_metric = ("f1", "max")

    def __init__(self, args, vocab, config, windowing, paths, info, device, log):
        self.args, self.vocab, self.config, self.windowing = args, vocab, config, windowing
        self.info, self.device, self.log = info, device, log
        self.outputs, self.run = outputs(args), checks.run_record(vars(args))
        self.best_model_path = self.outputs["--save"][0]
        train_questions, train_dataset = squad.read_squad(paths["train"], log)
        self.dev_questions, self.dev_dataset = squad.read_squad(paths["dev"], log)
        # Trained on SQuAD v2.0 data, the model learns to answer "" (saved with it, for
        # --predict); the metric follows the dev data.
        self.squad_v2 = metrics.has_unanswerable(train_dataset)
        self.name = "SQuAD v2.0" if self.squad_v2 else "SQuAD v1.1"  # in its state files
        self.null_threshold = args.null_threshold if self.squad_v2 else None
        self.train_windows = make_windows(train_questions, vocab, windowing, training=True)
        # Evaluations cut the dev windows as they go (answers.evaluate_all): counted here.
        n_dev, dev_unusable, dev_answers = count_windows(self.dev_questions, vocab, windowing)
        # Validations score --eval-batches' sample of the questions; the test scores all.
        self.valid_questions = [self.dev_questions[i] for i in data.evaluation_order(
            len(self.dev_questions), args.batch_size, args.eval_batches)]
        self.valid_dataset = squad.subset(self.dev_dataset, {q.qid for q in self.valid_questions})
        # The dev set is scored once at the end: the best validation's answers, when it
        # scored all of it, are the test's (new_best keeps them).
        self.last_validation = self.best_validation = None
        train = self.train_windows
        for path, unusable, n_answers, use in (
                (paths["train"], train.unusable_answers, train.n_answers, "skipped for training"),
                (paths["dev"], dev_unusable, dev_answers, "not used for the valid loss")):
            if unusable:
                log(f"{path}: {len(unusable)} of {n_answers} answers are not at their "
                    f"answer_start in the context (or have none); they are {use} (first: "
                    f"question id {unusable[0]})")
        if len(train) < info.world_size:
            raise UserError(f"{paths['train']}: no question with an answer found in its context "
                            "at answer_start: nothing to train on")
        without = int((train.start_positions == 0).sum())
        log(f"train: {squad.count_questions(train_questions)}, {len(train)} windows "
            f"({without} without the answer: targets at <cls>); dev: "
            f"{squad.count_questions(self.dev_questions)}, {n_dev} windows")

    def train_batches(self, epoch):
        # drop_last=False: a small train file still makes a batch; every rank gets the same
        # number of windows, so the same number of steps.
        a = self.args
        order = data.epoch_order(len(self.train_windows), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size, drop_last=False)
        seq_len = answers.batch_length(a.span_loss, a.bptt, a.compile)
        return data.Batches(functools.partial(window_batch, self.train_windows, seq_len), order,
                            a.batch_size)

    def loss(self, model, batch):
        return answers.span_loss(*answers.span_logits(model, batch, self.args.span_loss), batch)

    def evaluate(self, model, split):
        """Loss, exact match and F1 on the dev file (the "test" is the best model's answers
        to all of it, which rank 0 writes as the official predictions files and scores; the
        best validation's when that scored all of it), and how many questions were scored."""
        a = self.args
        if split == "test" and self.best_validation is not None:
            best, null_scores, loss = self.best_validation
        else:
            questions = self.dev_questions if split == "test" else self.valid_questions
            best, null_scores, loss = answers.evaluate_all(
                model, questions, self.vocab, self.windowing, a.batch_size, self.device,
                a.dtype, self.info, a.span_loss)
        if split == "valid" and len(self.valid_questions) == len(self.dev_questions):
            self.last_validation = (best, null_scores, loss)
        if split == "test" and self.info.is_main:
            paths = {flag: self.outputs[flag][0] for flag in ("--predictions", "--na-probs")}
            scores, _ = answers.write_predictions(paths, self.dev_dataset, best, null_scores,
                                                  self.null_threshold)
            if "best_f1" in scores:
                self.log(answers.v2_summary(scores))
        else:
            predictions = answers.to_predictions(best, null_scores, self.null_threshold)
            dataset = self.dev_dataset if split == "test" else self.valid_dataset
            scores = answers.official_scores(dataset, predictions)
        return {"loss": loss, "exact": scores["exact"], "f1": scores["f1"],
                "questions": len(best)}

    def save_best(self, model):
        checkpoint.save_model("qa", model, self.config, self.vocab, self.best_model_path,
                              windowing=asdict(self.windowing), squad_v2=self.squad_v2,
                              run=self.run)

    def new_best(self):
        """Every rank keeps the best validation's answers, for the test (evaluate)."""
        self.best_validation = self.last_validation

    def write_outputs(self, model):
        """Nothing more: --save holds the best model, the test wrote the predictions."""


def na_probs_path(args):
    """--na-probs, by default na_probs.json beside --predictions."""
    return args.na_probs or os.path.join(os.path.dirname(args.predictions), "na_probs.json")


def predict_file_paths(args):
    """{"--predictions", "--na-probs"} of --predict --predict-file FILE: unless given,
    FILE's name with .predictions.json and .na_probs.json in --output-dir, so that the
    training run's predictions.json and na_probs.json stay as they are."""
    if "predictions" in getattr(args, "explicit_outputs", ["predictions"]):
        return {"--predictions": args.predictions, "--na-probs": na_probs_path(args)}
    stem = os.path.splitext(os.path.basename(args.predict_file))[0]
    return {"--predictions": flags.in_output_dir(args, f"{stem}.predictions.json"),
            "--na-probs": args.na_probs or flags.in_output_dir(args, f"{stem}.na_probs.json")}


def outputs(args):
    """{flag: (path, what)} of the files a training run writes (besides the Trainer's)."""
    return {"--save": (args.save, "best model"), "--predictions": (args.predictions, "predictions"),
            "--na-probs": (na_probs_path(args), "no-answer values"),
            "the loss log": (flags.in_output_dir(args, "qa_loss.txt"), "losses"),
            "--save-vocab": (args.save_vocab, "vocab")}


def check_paths(args, info, train_config):
    """qa_task.py's inputs and outputs (see checks.prepare_run), before any work;
    `train_config`: the run's TrainConfig, None under --predict."""
    if args.predict:
        if args.predict_file is not None and (args.context or args.question):
            raise UserError("--predict: give --context and --question, or --predict-file, "
                            "not both")
        if args.predict_file is None and (args.context is None or args.question is None):
            raise UserError("--predict needs --context and --question, or --predict-file")
        writes = args.predict_file is not None
        return checks.prepare_run(
            info, inputs={"--qa-model": args.qa_model or args.save,
                          "--predict-file": args.predict_file},
            outputs=predict_file_paths(args) if writes else {},
            owner=checks.Owner.of(vars(args), trains=False))
    squad_files = {f"--{split}-file": given or os.path.join(args.data_dir, "squad",
                                                             squad.SQUAD[split].filename)
                   for split, given in (("train", args.train_file), ("dev", args.dev_file))}
    return checks.prepare_run(
        info, inputs={"--bert-model": args.bert_model, "--train-file": args.train_file,
                      "--dev-file": args.dev_file},
        outputs=checks.run_outputs(outputs(args), train_config),
        data_dir=args.data_dir, also_read=squad_files, owner=checks.Owner.of(vars(args)))


def predict(args, checked, device, log):
    """--predict: answers from a fine-tuned model, printed or written as predictions
    (`checked`: what check_paths returned, mains.fine_tune's; nothing it loads here)."""
    path = args.qa_model or args.save
    model, vocab, saved_windowing, squad_v2 = answers.load_qa_model(path)
    # The model answers best with the windows it was trained on: the settings saved with
    # it apply to every windowing flag left at its default.
    defaults = asdict(Windowing())
    saved = {k: v for k, v in saved_windowing.items()
             if k in defaults and getattr(args, k) == defaults[k]}
    windowing = flags.settings(Windowing, args, **saved)
    flags.check_bptt(windowing.bptt, model.bert_model.config, path, logs.to_stderr)  # stdout: the answers
    if args.predict_file is None:
        questions, dataset = [squad.Question("0", args.question, args.context, [])], None
    else:
        questions, dataset = squad.read_predict_file(args.predict_file, log)
    best, null_scores = answers.score_questions(model.to(device), questions, vocab, windowing,
                                                args.batch_size, device, args.dtype)
    null_threshold = args.null_threshold if squad_v2 else None
    if dataset is None:
        answers.print_answers(questions, best, null_scores, null_threshold, args.predict_file)
        return
    paths = predict_file_paths(args)
    scores, written = answers.write_predictions(paths, dataset, best, null_scores, null_threshold)
    log(f"wrote {' and '.join(written)}: {len(best)} answers | exact {scores['exact']:.2f}% | "
        f"f1 {scores['f1']:.2f}%")
    if "best_f1" in scores:
        log(answers.v2_summary(scores))


def start_task(args, weights, config, vocab, info, device, log):
    """(the QA task, the model) of a training run (mains.fine_tune)."""
    config.qa_gelu = args.qa_gelu  # the head is chosen here, whatever the encoder's config says
    windowing = flags.settings(Windowing, args)
    with distributed.main_rank_first(info):
        paths = {split: squad.squad_file(given, split, args.data_dir, log)
                 for split, given in (("train", args.train_file), ("dev", args.dev_file))}
    task = QA(args, vocab, config, windowing, paths, info, device, log)
    return task, checkpoint.task_model(QuestionAnswerTask, config, weights, args.bert_model,
                                       device)


def main(args, info):
    mains.fine_tune(args, info, "qa", check_paths, predict, start_task)


if __name__ == "__main__":
    mains.launch(main, flags.parse_args(get_parser()))
