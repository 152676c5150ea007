"""Windows to answers: the span logits and loss, the best span of every question over its
windows (on every rank), SQuAD v2.0's no-answer decision, and the predictions files scored
by the official metric. (transformers' utils_qa.py is the counterpart.)

An evaluation's memory does not grow with the dev file: windows are cut a chunk of
questions at a time (windows.window_chunks), and of each batch only every question's best
span so far is kept.
"""

import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import metrics
import utils
from bertkit import checkpoint
from bertkit.files import UserError, atomic_write_text
from bertkit.squad.windows import Windowing, collate, window_chunks
from bertkit.training import logs
from model import QuestionAnswerTask

# --null-threshold's default: answer "" when the no-answer score beats the best span at all,
# as Google BERT's run_squad.py (null_score_diff_threshold 0.0).
DEFAULT_NULL_THRESHOLD = 0.0


# --span-loss: whether the start/end softmax leaves padding out ("masked", ours, so a batch
# trimmed to its longest window gives the same loss) or counts every padding position of a
# window of --bptt tokens ("bert": Google's run_squad.py and transformers'
# BertForQuestionAnswering, whose windows are all padded to max_length). Decoding never
# looks at padding, so the two differ only in the loss, hence in training.
SPAN_LOSSES = ("masked", "bert")


def span_logits(model, batch, mode="masked"):
    """Start and end logits in fp32; -inf at padding unless `mode` (--span-loss) is "bert"."""
    padding_mask = batch["padding_mask"]
    start_logits, end_logits = model(batch["inputs"], batch["token_types"], padding_mask)
    start_logits, end_logits = start_logits.float(), end_logits.float()
    if mode == "bert":
        return start_logits, end_logits
    return (start_logits.masked_fill(~padding_mask, -math.inf),
            end_logits.masked_fill(~padding_mask, -math.inf))


def batch_length(mode, bptt, compile=False):
    """The length of a batch of windows: its longest window (None), or --bptt for
    --span-loss bert (the padding is part of its loss) and for --compile (one shape)."""
    return bptt if mode == "bert" or compile else None


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
                     rank=0, world_size=1, mode="masked"):
    """Score the windows of every world_size-th question from `rank`.

    Returns ({question id: (answer text, score)}, {question id: no-answer score}, loss sum,
    windows in the loss): the answer is the best span over all windows of the question,
    cut from the original context; "" (score -inf) only for a context without a single
    token. The no-answer score is the <cls> start + end logit of the window where it is
    lowest, as Google BERT's score_null. Windows go in order of length, so each batch is
    trimmed to little padding (with `mode` "bert", --span-loss bert, they are padded to
    --bptt, so that the loss is the one trained; the answers are the same).

    Of each batch only every question's best span so far is kept (read one batch late, so
    that a GPU computes the next batch meanwhile): holding every batch's results until the
    end left the heap in pieces, several times the memory of the windows themselves."""
    was_training = model.training
    model.eval()
    mine = torch.nonzero(windows.question % world_size == rank).flatten()
    mine = mine[torch.argsort(windows.lengths[mine], stable=True)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    best = {}  # question index -> [score, first token, last token] of its best window
    null = {}  # question index -> its lowest <cls> score over its windows
    pending = None  # the last batch's spans, read after the next batch is started
    # The whole dev set takes minutes to an hour on a CPU: a bar with rate and ETA.
    for indices in logs.progress(mine.split(batch_size), unit="batch", desc="QA evaluation"):
        seq_len = batch_length(mode, windows.tokens.size(1))
        batch = utils.to_device(collate(windows, indices, seq_len), device)
        with utils.autocast(device, dtype):
            start_logits, end_logits = span_logits(model, batch, mode)
        loss_sum += span_loss(start_logits, end_logits, batch, reduction="sum")
        if pending is not None:
            keep_best_spans(best, null, windows, *pending)
        pending = (indices, *best_spans(start_logits, end_logits, batch["context_mask"],
                                        max_answer_len), start_logits[:, 0] + end_logits[:, 0])
    if pending is not None:
        keep_best_spans(best, null, windows, *pending)
    model.train(was_training)
    n_loss = int((windows.start_positions[mine] >= 0).sum())
    answers, null_scores = {}, {}
    for question, (span_score, first, last) in best.items():
        q, char_spans = windows.questions[question], windows.context_spans[question]
        if span_score == -math.inf:
            answers[q.qid] = ("", span_score)
        else:
            answers[q.qid] = (q.context[char_spans[first][0]:char_spans[last][1]], span_score)
        null_scores[q.qid] = null[question]
    return answers, null_scores, loss_sum.item() if best else 0.0, n_loss


def keep_best_spans(best, null, windows, indices, score, start, end, cls_score):
    """Fold a batch of windows (rows `indices`) into `best` and `null` (evaluate_windows):
    a window's span replaces its question's best only when higher, so of equal scores
    the first window's stays."""
    # Row positions to indices of context tokens.
    to_context_token = (windows.context_start[indices] - windows.context_offset[indices]).tolist()
    for question, null_score, span_score, first, last, shift in zip(
            windows.question[indices].tolist(), cls_score.tolist(), score.tolist(),
            start.tolist(), end.tolist(), to_context_token):
        if question not in best or span_score > best[question][0]:
            best[question] = [span_score, first + shift, last + shift]
        null[question] = min(null_score, null.get(question, math.inf))


def evaluate_questions(model, questions, vocab, windowing, batch_size, device, dtype="fp32",
                       rank=0, world_size=1, mode="masked"):
    """evaluate_windows over the windows of `questions`, cut a chunk at a time
    (windows.window_chunks): its four results, summed over the chunks."""
    answers, null_scores, loss_sum, n_loss = {}, {}, 0.0, 0
    for windows in window_chunks(questions, vocab, windowing):
        part = evaluate_windows(model, windows, windowing.max_answer_len, batch_size, device,
                                dtype, rank, world_size, mode)
        answers.update(part[0])
        null_scores.update(part[1])
        loss_sum, n_loss = loss_sum + part[2], n_loss + part[3]
    return answers, null_scores, loss_sum, n_loss


def evaluate_all(model, questions, vocab, windowing, batch_size, device, dtype, info,
                 mode="masked"):
    """evaluate_questions over all ranks: every rank gets every answer, every no-answer
    score and the mean loss."""
    answers, null_scores, loss_sum, n_loss = evaluate_questions(
        model, questions, vocab, windowing, batch_size, device, dtype, info.rank,
        info.world_size, mode)
    if info.enabled:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, (answers, null_scores, loss_sum, n_loss))
        answers = {qid: a for part, _, _, _ in gathered for qid, a in part.items()}
        null_scores = {qid: s for _, part, _, _ in gathered for qid, s in part.items()}
        loss_sum, n_loss = sum(g[2] for g in gathered), sum(g[3] for g in gathered)
    # Back in the questions' order, so predictions files list them as the dataset does.
    answers = {q.qid: answers[q.qid] for q in questions}
    return answers, null_scores, loss_sum / n_loss if n_loss else math.nan


def score_questions(model, questions, vocab, windowing=None, batch_size=64, device="cpu",
                    dtype="fp32"):
    """({question id: (best span text, score)}, {question id: no-answer score}) for
    Questions (see read_squad): raw text in, answer strings out, in one process."""
    windowing = windowing or Windowing()
    answers, null_scores, _, _ = evaluate_questions(model, questions, vocab, windowing,
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


def official_scores(dataset, predictions):
    """{"exact", "f1"} percentages by the official metric of the data: v2.0 when it has
    unanswerable questions, else v1.1."""
    if metrics.has_unanswerable(dataset):
        scores = metrics.evaluate_v2(dataset, predictions)
        return {"exact": scores["exact"], "f1": scores["f1"]}
    scores = metrics.evaluate(dataset, predictions)
    return {"exact": scores["exact_match"], "f1": scores["f1"]}


def write_predictions(paths, dataset, answers, null_scores, null_threshold):
    """Write the predictions file (and, for SQuAD v2.0 data, the no-answer values) at
    `paths` ({"--predictions": path, "--na-probs": path}); return the official scores of
    the files as written: {"exact", "f1"}, and for v2.0 data the rest of evaluate_v2's.
    Returns the paths written too."""
    predictions = to_predictions(answers, null_scores, null_threshold)
    atomic_write_text(paths["--predictions"], json.dumps(predictions))
    predictions = metrics.load_predictions(paths["--predictions"])
    if not metrics.has_unanswerable(dataset):
        return official_scores(dataset, predictions), [paths["--predictions"]]
    atomic_write_text(paths["--na-probs"], json.dumps(no_answer_odds(answers, null_scores)))
    # The na_probs feed the best-threshold search only; na_prob_thresh inf scores the
    # answers as written (the official default, 1.0, would also count "" for a span whose
    # value is above 1).
    scores = metrics.evaluate_v2(dataset, predictions, metrics.load_na_probs(paths["--na-probs"]),
                                 na_prob_thresh=math.inf)
    scores["answered_empty"] = sum(not text for text in predictions.values())
    return scores, [paths["--predictions"], paths["--na-probs"]]


def v2_summary(scores):
    """One log line of evaluate_v2's scores beyond exact and f1."""
    parts = [f"| SQuAD v2.0 | {scores['answered_empty']} of {scores['total']} answered \"\""]
    for prefix in ("HasAns", "NoAns"):
        if f"{prefix}_total" in scores:
            parts.append(f"{prefix} exact {scores[prefix + '_exact']:.2f}% f1 "
                         f"{scores[prefix + '_f1']:.2f}% ({scores[prefix + '_total']})")
    parts.append(f"best exact {scores['best_exact']:.2f}% at {scores['best_exact_thresh']:.4f}, "
                 f"best f1 {scores['best_f1']:.2f}% at {scores['best_f1_thresh']:.4f}")
    return " | ".join(parts)


def load_qa_model(path):
    """(model, vocab, windowing saved with it, whether it was trained on SQuAD v2.0 data)
    from a checkpoint written by --save."""
    model, vocab, ckpt = checkpoint.load_task_model(
        QuestionAnswerTask, "qa", path, "--qa-model",
        "a question-answering model (qa_task.py writes those to --save)")
    windowing = ckpt.get("windowing", {})  # a dict (checkpoint.check_fields) of whole numbers
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in windowing.values()):
        raise UserError(f"--qa-model {path}: its saved windowing {windowing!r:.80} is not "
                        "a dict of whole numbers")
    # Checkpoints from before SQuAD v2.0 support have no squad_v2: v1.1 models.
    return model, vocab, windowing, bool(ckpt.get("squad_v2", False))


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
