"""Fine-tuning a pretrained BERT encoder on SQuAD v1.1 or v2.0 question answering.

    python qa_task.py --bert-model ns_bert.pt                    # qa_model.pt, predictions.json
    python metrics.py .data/squad/dev-v1.1.json predictions.json  # the official EM / F1
    python qa_task.py --predict --context "..." --question "..."  # an answer from qa_model.pt

A question becomes model inputs in make_windows: its context is tokenized with the
character span of every token, then cut into overlapping windows
`<cls> question <sep> context window <sep>` of at most --bptt tokens. Every window is
scored, and the answer is the best span over all windows of the question (best_spans),
cut from the original context string, so the official metric sees real answer text.

SQuAD v2.0 data (questions without an answer: an empty answers list) is recognized from
the files. Training points an unanswerable question at <cls> in every window; decoding
answers "" when the question's <cls> score (its no-answer score) beats the best span by
more than --null-threshold, and --na-probs gets that margin for the official v2.0 metric.
"""

import bisect
import functools
import json
import math
import os
import sys
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import checks
import corpus
import data
import metrics
import utils
from model import QuestionAnswerTask
from trainer import Trainer
from utils import UserError

SQUAD = {
    "train": corpus.Archive("train-v1.1.json", "981b29407e0affa3b1b156f72073b945",
                            ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",)),
    "dev": corpus.Archive("dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552",
                          ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",)),
}


# --null-threshold's default: answer "" when the no-answer score beats the best span at all,
# as Google BERT's run_squad.py (null_score_diff_threshold 0.0).
DEFAULT_NULL_THRESHOLD = 0.0


@dataclass
class Windowing:
    """How a question and its context become windows; the defaults of the flags
    --bptt, --doc-stride, --max-query-len and --max-answer-len."""

    bptt: int = 128  # tokens of a window, <cls> and both <sep> included
    doc_stride: int = 64  # context tokens between the starts of consecutive windows (at most)
    max_query_len: int = 64  # question tokens kept
    max_answer_len: int = 30  # longest answer predicted, in tokens

    @classmethod
    def from_args(cls, args):
        return cls(args.bptt, args.doc_stride, args.max_query_len, args.max_answer_len)

    def check(self, max_len, source):
        if self.bptt > max_len:
            raise UserError(f"--bptt {self.bptt} is longer than the {max_len} positions "
                            f"of {source}")
        if min(self.doc_stride, self.max_answer_len) < 1 or self.max_query_len < 0:
            raise UserError("--doc-stride and --max-answer-len must be at least 1, "
                            "--max-query-len at least 0")
        if self.bptt - self.max_query_len - 3 < 1:
            raise UserError(f"--bptt {self.bptt} leaves no room for context after a question of "
                            f"--max-query-len {self.max_query_len} tokens (needs bptt >= "
                            f"max-query-len + 4)")


def get_parser():
    w = Windowing
    parser = checks.ArgumentParser(prog="qa_task.py", description="BERT question answering "
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
                             "official format (default predictions.json)")
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
    parser.add_argument("--null-threshold", type=float, default=DEFAULT_NULL_THRESHOLD,
                        help="models trained on SQuAD v2.0 data: answer \"\" (no answer) when "
                             "the question's no-answer score minus its best span's score, both "
                             "start + end logits, is above this; higher answers more questions "
                             f"(default {DEFAULT_NULL_THRESHOLD})")
    parser.add_argument("--na-probs", type=str, default=None,
                        help="SQuAD v2.0 dev data: where to write {question id: no-answer score "
                             "- best span score} for every question (logits, as Google BERT's "
                             "null_odds.json), the official script's --na-prob-file (default "
                             "na_probs.json in the folder of --predictions)")
    parser.add_argument("--qa-gelu", action="store_true",
                        help="the old example's QA head: a GELU on the encoder output before the "
                             "span layer (default off: BERT's head, one linear layer)")
    utils.add_model_flags(parser)
    utils.add_common_flags(parser, lr=5.0, clip=0.1, epochs=2, batch_size=72, bptt=w.bptt,
                           seed=21192391, log_interval=200, save="qa_model.pt",
                           state_file="qa_state.pt")
    return parser


###############################################################################
# SQuAD questions
###############################################################################


@dataclass
class Question:
    qid: str
    text: str
    context: str  # the paragraph, shared by its questions
    answers: list  # [(answer text, answer_start)]; answer_start None when the file has none
    unanswerable: bool = False  # SQuAD v2.0: no answer in the context (an empty answers list)


def squad_file(given, split, data_dir, log):
    """--train-file / --dev-file, or SQuAD's own file under <data-dir>/squad/ (downloaded)."""
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--{split}-file {given}: no such file")
        return Path(given)
    archive = SQUAD[split]
    path = Path(data_dir) / "squad" / archive.filename
    if not path.exists():
        corpus.download_archive(archive, path.parent, log, expected=[path])
    return path


def read_squad(path):
    """(questions, the file's `data` list) of a SQuAD v1.1 or v2.0 file; UserError if
    unusable (load_squad_json checks, among the rest, that v2.0's is_impossible agrees
    with the answers list). metrics.has_unanswerable(data) tells v2.0 data."""
    try:
        dataset = metrics.load_squad_json(path)
    except metrics.SquadFormatError as e:
        raise UserError(str(e)) from None
    questions, seen = [], set()
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa["id"] in seen:
                    raise UserError(f"{path}: question id {qa['id']!r} appears twice; "
                                    "predictions are keyed by id")
                seen.add(qa["id"])
                answers = []
                for answer in qa["answers"]:
                    start = answer.get("answer_start")
                    if not isinstance(start, int) or isinstance(start, bool):
                        start = None  # unusable for training, like a wrong one
                    answers.append((answer["text"], start))
                questions.append(Question(qa["id"], qa["question"], paragraph["context"], answers,
                                          unanswerable=not answers))
    return questions, dataset


def answer_token_span(context, spans, text, answer_start):
    """(first, last) index of the context tokens an answer covers; None when the text is
    not found at answer_start in the context or covers no token (only quotes or spaces)."""
    if (answer_start is None or answer_start < 0 or not text
            or context[answer_start:answer_start + len(text)] != text):
        return None
    answer_end = answer_start + len(text)
    # The first token that ends after the answer starts, the last that starts before it ends.
    first = bisect.bisect_right([end for _, end in spans], answer_start)
    last = bisect.bisect_left([start for start, _ in spans], answer_end) - 1
    return (first, last) if first <= last else None


###############################################################################
# Windows
###############################################################################


def window_starts(n_context, window_len, stride):
    """Index of the first context token of each window: every `stride` tokens until a
    window reaches the end of the context, as BERT's own SQuAD code (and transformers'
    examples) cut them; the last window holds what is left and may be shorter."""
    if n_context <= window_len:
        return [0]
    return list(range(0, n_context - window_len + stride, stride))


@dataclass
class Windows:
    """Every window of a list of questions, as rows of --bptt token ids."""

    questions: list
    context_spans: list  # per question: (start, end) characters of each context token
    tokens: torch.Tensor  # (n, bptt) int32: <cls> question <sep> context window <sep> <pad>...
    lengths: torch.Tensor  # (n,) tokens before the padding
    context_offset: torch.Tensor  # (n,) position of the first context token in the row
    context_start: torch.Tensor  # (n,) index of that token among the context's tokens
    question: torch.Tensor  # (n,) index into `questions`
    # Training targets (row positions): the answer's first and last token when the window
    # holds the whole answer, else 0 (<cls>); 0 in every window of an unanswerable question
    # (SQuAD v2.0); -1 when the question has answers but none usable.
    start_positions: torch.Tensor
    end_positions: torch.Tensor
    unusable_answers: list  # the question id of every answer not found at its answer_start
    n_answers: int

    def __len__(self):
        return len(self.lengths)


def make_windows(questions, vocab, windowing, training=False):
    """Cut every question's context into windows (see Windowing).

    Answers are placed by answer_start; one whose text is not at answer_start in the
    context is not used (listed in `unusable_answers`). With training=True a question
    whose answers are all unusable gets no window; otherwise every question gets at least
    one, so no question is ever dropped from an evaluation.

    An unanswerable question (SQuAD v2.0) targets <cls> in every window, in training as
    in evaluation (so the dev loss counts it), as BERT does: the <cls> score becomes the
    model's score for "no answer".

    Training windows that do not hold the whole answer are kept with both targets at
    <cls> (position 0), as in BERT's own SQuAD code: they teach the model to score spans
    low in windows without the answer, which is what makes the scores of different
    windows comparable when decoding picks the best one."""
    w = windowing
    tokenized = {}  # context -> (ids, spans): the questions of a paragraph share one
    tokens, padding = array("i"), array("i", [vocab.pad_id]) * w.bptt
    rows = []  # per window: the Windows fields from lengths to end_positions, in order
    context_spans, unusable, n_answers = [], [], 0
    for index, question in enumerate(questions):
        if question.context not in tokenized:
            tokenized[question.context] = vocab.encode_with_spans(question.context)
        context_ids, spans = tokenized[question.context]
        context_spans.append(spans)
        answer_spans = [answer_token_span(question.context, spans, text, start)
                        for text, start in question.answers]
        n_answers += len(answer_spans)
        unusable += [question.qid] * answer_spans.count(None)
        answer = next((span for span in answer_spans if span is not None), None)
        if training and answer is None and not question.unanswerable:
            continue
        question_ids = vocab.encode(question.text)[:w.max_query_len]
        offset = len(question_ids) + 2
        window_len = w.bptt - offset - 1
        # Consecutive windows overlap by at least max_answer_len - 1 tokens, so every span
        # the decoder may predict lies whole inside some window.
        stride = max(1, min(w.doc_stride, window_len - w.max_answer_len + 1))
        for start in window_starts(len(context_ids), window_len, stride):
            row = [vocab.cls_id, *question_ids, vocab.sep_id,
                   *context_ids[start:start + window_len], vocab.sep_id]
            tokens.extend(row)
            tokens.extend(padding[:w.bptt - len(row)])
            if question.unanswerable:
                target = (0, 0)
            elif answer is None:
                target = (-1, -1)
            elif start <= answer[0] and answer[1] < start + window_len:
                target = (answer[0] - start + offset, answer[1] - start + offset)
            else:
                target = (0, 0)
            rows.append((len(row), offset, start, index, *target))
    columns = torch.tensor(rows, dtype=torch.long).reshape(-1, 6).unbind(1)
    tokens = (torch.frombuffer(tokens, dtype=torch.int32) if tokens
              else torch.empty(0, dtype=torch.int32))
    return Windows(questions, context_spans, tokens.view(-1, w.bptt), *columns,
                   unusable_answers=unusable, n_answers=n_answers)


def collate(windows, indices, seq_len=None):
    """A batch of windows, cut to its longest row: the padding beyond that would only be
    masked, so the math per real token is the same. `seq_len` fixes the length instead
    (--compile pads every batch to --bptt: one shape, one compiled graph)."""
    lengths = windows.lengths[indices]
    seq_len = seq_len or int(lengths.max())
    position = torch.arange(seq_len)
    context_offset = windows.context_offset[indices, None]
    return {
        "inputs": windows.tokens[indices, :seq_len].long(),
        # 0 for <cls> question <sep>, 1 for the context and its <sep>, 0 for padding.
        "token_types": ((position >= context_offset) & (position < lengths[:, None])).long(),
        "context_mask": (position >= context_offset) & (position < lengths[:, None] - 1),
        "start_positions": windows.start_positions[indices],
        "end_positions": windows.end_positions[indices],
        "padding_mask": position < lengths[:, None],
    }


###############################################################################
# Loss and decoding
###############################################################################


def span_logits(model, batch):
    """Start and end logits in fp32, -inf at padding (so trimming a batch changes nothing)."""
    padding_mask = batch["padding_mask"]
    start_logits, end_logits = model(batch["inputs"], batch["token_types"], padding_mask)
    return (start_logits.float().masked_fill(~padding_mask, -math.inf),
            end_logits.float().masked_fill(~padding_mask, -math.inf))


def span_loss(start_logits, end_logits, batch, reduction="mean"):
    """Mean of the start and end cross-entropies, per window; windows whose question has
    no usable answer (targets -1, only in evaluation) are left out."""
    return (F.cross_entropy(start_logits, batch["start_positions"], reduction=reduction,
                            ignore_index=-1)
            + F.cross_entropy(end_logits, batch["end_positions"], reduction=reduction,
                              ignore_index=-1)) / 2


def best_spans(start_logits, end_logits, context_mask, max_answer_len):
    """The best span of each row: start <= end < start + max_answer_len, both where
    context_mask (batch, seq) is True. Returns (score, start, end), each (batch,); the
    score is start logit + end logit, -inf for a row without context.

    All spans are scored at once as a (batch, seq, max_answer_len) tensor whose [b, i, k]
    is the span from i to i + k: a band of the (start, end) matrix, not all of it."""
    batch, seq_len = start_logits.shape
    span_len = min(max_answer_len, seq_len)
    start_logits = start_logits.masked_fill(~context_mask, -math.inf)
    end_logits = F.pad(end_logits.masked_fill(~context_mask, -math.inf), (0, span_len - 1),
                       value=-math.inf)
    scores = start_logits[:, :, None] + end_logits.unfold(1, span_len, 1)
    score, flat_index = scores.view(batch, -1).max(dim=1)
    start = flat_index // span_len
    return score, start, start + flat_index % span_len


@torch.no_grad()
def evaluate_windows(model, windows, max_answer_len, batch_size, device, dtype="fp32",
                     rank=0, world_size=1):
    """Score the windows of every world_size-th question from `rank`.

    Returns ({question id: (answer text, score)}, {question id: no-answer score}, loss sum,
    windows in the loss): the answer is the best span over all windows of the question,
    cut from the original context; "" (score -inf) only for a context without a single
    token. The no-answer score is the <cls> start + end logit of the window where it is
    lowest, as Google BERT's score_null. Windows go in order of length, so each batch is
    trimmed to little padding."""
    was_training = model.training
    model.eval()
    mine = torch.nonzero(windows.question % world_size == rank).flatten()
    mine = mine[torch.argsort(windows.lengths[mine], stable=True)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    spans = []  # (score, start, end, <cls> score) per batch, left on the device until the end
    # The whole dev set takes minutes to an hour on a CPU: a bar with rate and ETA.
    for indices in utils.progress(mine.split(batch_size), unit="batch", desc="QA evaluation"):
        batch = utils.to_device(collate(windows, indices), device)
        with utils.autocast(device, dtype):
            start_logits, end_logits = span_logits(model, batch)
        loss_sum += span_loss(start_logits, end_logits, batch, reduction="sum")
        spans.append((*best_spans(start_logits, end_logits, batch["context_mask"], max_answer_len),
                      start_logits[:, 0] + end_logits[:, 0]))
    model.train(was_training)
    if not spans:  # more ranks than questions
        return {}, {}, 0.0, 0
    n_loss = int((windows.start_positions[mine] >= 0).sum())
    score, start, end, cls_score = (torch.cat(part).cpu() for part in zip(*spans))
    # Row positions to indices of context tokens.
    to_context_token = windows.context_start[mine] - windows.context_offset[mine]
    first_token, last_token = (start + to_context_token).tolist(), (end + to_context_token).tolist()
    best = {}  # question index -> (score, first token, last token) of its best window
    null = {}  # question index -> its lowest <cls> score over its windows
    for question, null_score, *span in zip(windows.question[mine].tolist(), cls_score.tolist(),
                                           score.tolist(), first_token, last_token):
        if question not in best or span[0] > best[question][0]:
            best[question] = span
        null[question] = min(null_score, null.get(question, math.inf))
    answers, null_scores = {}, {}
    for question, (span_score, first, last) in best.items():
        q, char_spans = windows.questions[question], windows.context_spans[question]
        if span_score == -math.inf:
            answers[q.qid] = ("", span_score)
        else:
            answers[q.qid] = (q.context[char_spans[first][0]:char_spans[last][1]], span_score)
        null_scores[q.qid] = null[question]
    return answers, null_scores, loss_sum.item(), n_loss


def evaluate_all(model, windows, max_answer_len, batch_size, device, dtype, info):
    """evaluate_windows over all ranks: every rank gets every answer, every no-answer score
    and the mean loss."""
    answers, null_scores, loss_sum, n_loss = evaluate_windows(
        model, windows, max_answer_len, batch_size, device, dtype, info.rank, info.world_size)
    if info.enabled:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, (answers, null_scores, loss_sum, n_loss))
        answers = {qid: a for part, _, _, _ in gathered for qid, a in part.items()}
        null_scores = {qid: s for _, part, _, _ in gathered for qid, s in part.items()}
        loss_sum, n_loss = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    # Back in the questions' order, so predictions files list them as the dataset does.
    answers = {q.qid: answers[q.qid] for q in windows.questions}
    return answers, null_scores, loss_sum / n_loss if n_loss else math.nan


def score_questions(model, questions, vocab, windowing=None, batch_size=64, device="cpu",
                    dtype="fp32"):
    """({question id: (best span text, score)}, {question id: no-answer score}) for
    Questions (see read_squad): raw text in, answer strings out, in one process."""
    windowing = windowing or Windowing()
    windows = make_windows(questions, vocab, windowing)
    answers, null_scores, _, _ = evaluate_windows(model, windows, windowing.max_answer_len,
                                                  batch_size, torch.device(device), dtype)
    return {q.qid: answers[q.qid] for q in questions}, null_scores


def predict_answers(model, questions, vocab, windowing=None, batch_size=64, device="cpu",
                    dtype="fp32"):
    """{question id: (answer text, score)}: the best span of each question, as a model
    trained on SQuAD v1.1 answers."""
    return score_questions(model, questions, vocab, windowing, batch_size, device, dtype)[0]


###############################################################################
# No answer (SQuAD v2.0)
###############################################################################


def no_answer_odds(answers, null_scores):
    """{question id: no-answer score - best span score}, Google BERT's null_odds.json and
    the official v2.0 script's --na-prob-file (any increasing score will do there). A
    question without a span (a context without a token) gets the largest float: JSON has
    no infinity, and the official best-threshold search sorts by these values."""
    return {qid: min(null_scores[qid] - score, sys.float_info.max)
            for qid, (_, score) in answers.items()}


def to_predictions(answers, null_scores, null_threshold=None):
    """{question id: answer text}: the best span, or "" (no answer) where the no-answer
    score beats it by more than null_threshold. None: always the span, as a model trained
    on SQuAD v1.1 answers (it never learned what "no answer" is)."""
    if null_threshold is None:
        return {qid: text for qid, (text, _) in answers.items()}
    odds = no_answer_odds(answers, null_scores)
    return {qid: "" if odds[qid] > null_threshold else text
            for qid, (text, _) in answers.items()}


def na_probs_path(args):
    """--na-probs, by default na_probs.json beside --predictions."""
    return args.na_probs or os.path.join(os.path.dirname(args.predictions), "na_probs.json")


def check_paths(args, info):
    """qa_task.py's inputs and outputs (see checks.prepare_run), before any work."""
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
            outputs={"--predictions": args.predictions if writes else None,
                     "--na-probs": na_probs_path(args) if writes else None})
    squad = {f"--{split}-file": given or os.path.join(args.data_dir, "squad", SQUAD[split].filename)
             for split, given in (("train", args.train_file), ("dev", args.dev_file))}
    checks.prepare_run(
        info, inputs={"--bert-model": args.bert_model, "--train-file": args.train_file,
                      "--dev-file": args.dev_file},
        outputs={"--save": args.save, "--state-file": args.state_file,
                 "--metrics-file": args.metrics_file,
                 "--save-vocab": args.save_vocab, "--predictions": args.predictions,
                 "--na-probs": na_probs_path(args), "the loss log": "qa_loss.txt"},
        data_dir=args.data_dir, also_read=squad)


def files_written(args, dataset):
    """The files write_predictions writes, for the log."""
    if metrics.has_unanswerable(dataset):
        return [args.predictions, na_probs_path(args)]
    return [args.predictions]


def write_predictions(args, dataset, answers, null_scores, null_threshold):
    """Write --predictions (and --na-probs for SQuAD v2.0 data); return (exact, f1, the
    v2.0 line for the log or None): the official scores of the files as written."""
    predictions = to_predictions(answers, null_scores, null_threshold)
    utils.atomic_write_text(args.predictions, json.dumps(predictions))
    predictions = metrics.load_predictions(args.predictions)
    if not metrics.has_unanswerable(dataset):
        return *official_scores(dataset, predictions), None
    utils.atomic_write_text(na_probs_path(args), json.dumps(no_answer_odds(answers, null_scores)))
    # The na_probs feed the best-threshold search only; na_prob_thresh inf scores the
    # answers as written (the official default, 1.0, would also count "" for a span whose
    # value is above 1).
    scores = metrics.evaluate_v2(dataset, predictions, metrics.load_na_probs(na_probs_path(args)),
                                 na_prob_thresh=math.inf)
    return scores["exact"], scores["f1"], v2_summary(scores, predictions)


def v2_summary(scores, predictions):
    """One log line of evaluate_v2's scores beyond exact and f1."""
    parts = [f"| SQuAD v2.0 | {sum(not text for text in predictions.values())} of "
             f"{len(predictions)} answered \"\""]
    for prefix in ("HasAns", "NoAns"):
        if f"{prefix}_total" in scores:
            parts.append(f"{prefix} exact {scores[prefix + '_exact']:.2f}% f1 "
                         f"{scores[prefix + '_f1']:.2f}% ({scores[prefix + '_total']})")
    parts.append(f"best exact {scores['best_exact']:.2f}% at {scores['best_exact_thresh']:.4f}, "
                 f"best f1 {scores['best_f1']:.2f}% at {scores['best_f1_thresh']:.4f}")
    return " | ".join(parts)


###############################################################################
# The task, for utils.Trainer
###############################################################################


class QA:
    """What the shared Trainer needs to know about SQuAD fine-tuning."""

    def __init__(self, args, vocab, config, windowing, train_path, dev_path, info, device, log):
        self.args, self.vocab, self.config, self.windowing = args, vocab, config, windowing
        self.info, self.device = info, device
        train_questions, train_dataset = read_squad(train_path)
        dev_questions, self.dev_dataset = read_squad(dev_path)
        # Trained on SQuAD v2.0 data, the model learns to answer "" (saved with it, for
        # --predict); the metric follows the dev data.
        self.squad_v2 = metrics.has_unanswerable(train_dataset)
        self.null_threshold = args.null_threshold if self.squad_v2 else None
        self.train_windows = make_windows(train_questions, vocab, windowing, training=True)
        self.dev_windows = make_windows(dev_questions, vocab, windowing)
        for path, windows, use in ((train_path, self.train_windows, "skipped for training"),
                                   (dev_path, self.dev_windows, "not used for the valid loss")):
            if windows.unusable_answers:
                log(f"{path}: {len(windows.unusable_answers)} of {windows.n_answers} answers "
                    f"are not at their answer_start in the context (or have none); they are {use} "
                    f"(first: question id {windows.unusable_answers[0]})")
        if len(self.train_windows) < info.world_size:
            raise UserError(f"{train_path}: no question with an answer found in its context "
                            "at answer_start: nothing to train on")
        without = int((self.train_windows.start_positions == 0).sum())
        log(f"train: {count_questions(train_questions)}, {len(self.train_windows)} windows "
            f"({without} without the answer: targets at <cls>); dev: "
            f"{count_questions(dev_questions)}, {len(self.dev_windows)} windows")

    def train_batches(self, epoch):
        # drop_last=False: a small train file still makes a batch; every rank gets the same
        # number of windows, so the same number of steps.
        a = self.args
        order = data.epoch_order(len(self.train_windows), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size, drop_last=False)
        seq_len = a.bptt if a.compile else None
        return data.Batches(functools.partial(window_batch, self.train_windows, seq_len), order,
                            a.batch_size)

    @staticmethod
    def loss(model, batch):
        start_logits, end_logits = span_logits(model, batch)
        return span_loss(start_logits, end_logits, batch)

    def predict(self, model):
        """({question id: (best span, score)}, {question id: no-answer score}, mean dev loss)
        for every dev question."""
        a = self.args
        return evaluate_all(model, self.dev_windows, a.max_answer_len, a.batch_size, self.device,
                            a.dtype, self.info)

    def evaluate(self, model, split="valid"):
        answers, null_scores, loss = self.predict(model)
        predictions = to_predictions(answers, null_scores, self.null_threshold)
        exact, f1 = official_scores(self.dev_dataset, predictions)
        return loss, -f1, f"exact {exact:.2f}% | f1 {f1:.2f}%"

    def save_best(self, model):
        checkpoint.save_model("qa", model, self.config, self.vocab, self.args.save,
                              windowing=asdict(self.windowing), squad_v2=self.squad_v2)


def count_questions(questions):
    """"N questions", and how many have no answer when some do (SQuAD v2.0)."""
    unanswerable = sum(q.unanswerable for q in questions)
    return f"{len(questions)} questions" + (f" ({unanswerable} unanswerable)" if unanswerable
                                            else "")


def official_scores(dataset, predictions):
    """(exact, f1) percentages by the official metric of the data: v2.0 when it has
    unanswerable questions, else v1.1."""
    if metrics.has_unanswerable(dataset):
        scores = metrics.evaluate_v2(dataset, predictions)
        return scores["exact"], scores["f1"]
    scores = metrics.evaluate(dataset, predictions)
    return scores["exact_match"], scores["f1"]


def window_batch(windows, seq_len, index, rows):
    """Batch `index` of an epoch (data.Batches' make_batch): the windows `rows`."""
    return collate(windows, rows, seq_len)


###############################################################################
# --predict
###############################################################################


def load_qa_model(path):
    """(model, vocab, windowing saved with it, whether it was trained on SQuAD v2.0 data)
    from a checkpoint written by --save."""
    model, vocab, ckpt = checkpoint.load_task_model(
        QuestionAnswerTask, "qa", path, "--qa-model",
        "a question-answering model (qa_task.py writes those to --save)")
    # Checkpoints from before SQuAD v2.0 support have no squad_v2: v1.1 models.
    return model, vocab, ckpt.get("windowing", {}), bool(ckpt.get("squad_v2", False))


def read_predict_file(path):
    """Questions of --predict-file, and its SQuAD `data` list (None for a plain list)."""
    try:
        with open(path, encoding="utf-8") as f:
            root = json.load(f)
    except OSError as e:
        raise UserError(f"--predict-file {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--predict-file {path}: not JSON ({e})") from None
    if isinstance(root, dict) and "data" in root:
        return read_squad(path)
    items = root if isinstance(root, list) else [root]
    questions = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("context"), str)
                and isinstance(item.get("question"), str)):
            raise UserError(f"--predict-file {path}: item {i} is not an object with string "
                            "'context' and 'question'")
        questions.append(Question(str(item.get("id", i)), item["question"], item["context"], []))
    if not questions:
        raise UserError(f"--predict-file {path}: no questions")
    return questions, None


def predict(args, device, log):
    path = args.qa_model or args.save
    model, vocab, saved_windowing, squad_v2 = load_qa_model(path)
    # The model answers best with the windows it was trained on: the settings saved with
    # it apply to every windowing flag left at its default.
    defaults, flags = asdict(Windowing()), asdict(Windowing.from_args(args))
    windowing = Windowing(**{k: saved_windowing.get(k, v) if v == defaults[k] else v
                             for k, v in flags.items()})
    windowing.check(model.bert_model.config.max_len, path)
    if args.predict_file is None:
        questions, dataset = [Question("0", args.question, args.context, [])], None
    else:
        questions, dataset = read_predict_file(args.predict_file)
    answers, null_scores = score_questions(model.to(device), questions, vocab, windowing,
                                           args.batch_size, device, args.dtype)
    null_threshold = args.null_threshold if squad_v2 else None
    if dataset is None:
        print_answers(questions, answers, null_scores, null_threshold, args.predict_file)
        return
    exact, f1, v2_line = write_predictions(args, dataset, answers, null_scores, null_threshold)
    log(f"wrote {' and '.join(files_written(args, dataset))}: {len(answers)} answers | "
        f"exact {exact:.2f}% | f1 {f1:.2f}%")
    if v2_line:
        log(v2_line)


def print_answers(questions, answers, null_scores, null_threshold, predict_file):
    """One JSON line per question: its answer and the best span's score; from a model
    trained on SQuAD v2.0 (null_threshold given) also whether the answer is "no answer"
    and the no-answer score it was decided by."""
    predictions = to_predictions(answers, null_scores, null_threshold)
    for q in questions:
        line = {"answer": predictions[q.qid], "score": rounded(answers[q.qid][1])}
        if null_threshold is not None:
            line = {"answer": predictions[q.qid], "no_answer": not predictions[q.qid],
                    "score": line["score"], "null_score": rounded(null_scores[q.qid])}
        print(json.dumps(line if predict_file is None else {"id": q.qid, **line}))


def rounded(score):
    """A score for a JSON line: 4 decimals, None for -inf (no span at all)."""
    return round(score, 4) if math.isfinite(score) else None


###############################################################################
# Main
###############################################################################


def main(args, info):
    log = utils.make_logger(info)
    device = utils.setup_device(args, info)
    torch.manual_seed(args.seed)
    check_paths(args, info)
    if args.predict:
        if info.is_main:
            predict(args, device, log)
        return

    config, vocab, encoder = checkpoint.load_pretrained(args.bert_model)
    utils.apply_model_flags(config, args, source=args.bert_model)
    config.qa_gelu = args.qa_gelu  # the head is chosen here, whatever the encoder's config says
    windowing = Windowing.from_args(args)
    windowing.check(config.max_len, args.bert_model)
    with utils.main_rank_first(info):
        train_path = squad_file(args.train_file, "train", args.data_dir, log)
        dev_path = squad_file(args.dev_file, "dev", args.data_dir, log)
    task = QA(args, vocab, config, windowing, train_path, dev_path, info, device, log)
    model = checkpoint.task_model_from_encoder(QuestionAnswerTask, config, encoder,
                                               args.bert_model, device)
    log(f"QuestionAnswerTask from {args.bert_model}: {config.nlayers} layers, hidden "
        f"{config.emsize}, vocab {len(vocab)}, device {device}, {info.world_size} process(es)")
    trainer = Trainer(task, model, args, info, device, log)
    if trainer.fit():
        return

    # Evaluate the best model once more and write the official predictions file (and, for
    # SQuAD v2.0 dev data, the no-answer values); the EM / F1 printed are those of the files
    # as written.
    answers, null_scores, test_loss = task.predict(trainer.load_best(args.save))
    if info.is_main:
        exact, f1, v2_line = write_predictions(args, task.dev_dataset, answers, null_scores,
                                               task.null_threshold)
        log("=" * 89)
        log(f"| End of training | test loss {test_loss:8.5f} | exact {exact:.2f}% | f1 {f1:.2f}%")
        if v2_line:
            log(v2_line)
        log("=" * 89)
        st = trainer.state
        utils.print_loss_log("qa_loss.txt", st.train_loss_log, st.val_loss_log, test_loss, args)
        checkpoint.save_vocab_copy(vocab, args.save_vocab, log)
        trainer.metrics.close()
        files = [f"{args.save} (best model)", *files_written(args, task.dev_dataset),
                 "qa_loss.txt (losses)", f"{args.save_vocab} (vocab)", *trainer.files_written()]
        log(f"wrote {', '.join(files)}")


if __name__ == "__main__":
    utils.launch(main, checks.parse_args(get_parser()))
