"""SQuAD questions to model inputs: each context cut into overlapping windows
`<cls> question <sep> context window <sep>` of at most --bptt tokens, with the character
span of every context token (so answers are cut from the original text) and the answer's
position in each window as the training target; then batches of windows.
"""

import bisect
from array import array
from dataclasses import dataclass
from typing import ClassVar

import torch

import utils


@dataclass
class Windowing:
    """How a question and its context become windows; the defaults of the flags
    --bptt, --doc-stride, --max-query-len and --max-answer-len."""

    bptt: int = 128  # tokens of a window, <cls> and both <sep> included
    doc_stride: int = 64  # context tokens between the starts of consecutive windows (at most)
    max_query_len: int = 64  # question tokens kept
    max_answer_len: int = 30  # longest answer predicted, in tokens

    RULES: ClassVar = {
        "doc_stride": (utils.at_least(1), "must be at least 1"),
        "max_query_len": (utils.at_least(0), "must be at least 0"),
        "max_answer_len": (utils.at_least(1), "must be at least 1"),
    }

    def __post_init__(self):
        utils.check_rules(self, self.RULES)
        if self.bptt - self.max_query_len - 3 < 1:
            raise utils.SettingError(
                "bptt", self.bptt, f"leaves no room for context after a question of "
                f"--max-query-len {self.max_query_len} tokens (needs bptt >= max-query-len + 4)")


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


def make_windows(questions, vocab, windowing, training=False, tokenized=None):
    """Cut every question's context into windows (see Windowing). `tokenized`: {context:
    (ids, spans)} of contexts already tokenized, filled as contexts are (window_chunks).

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
    tokenized = {} if tokenized is None else tokenized  # the questions of a paragraph share one
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


# An evaluation holds the windows of about this many at a time (4 MB of token ids at --bptt
# 128), so that its memory does not grow with the dev file: a book-length context makes
# thousands of windows for each of its questions.
CHUNK_WINDOWS = 8192


def window_chunks(questions, vocab, windowing, max_windows=None):
    """make_windows of consecutive groups of `questions`, each of about max_windows
    windows at most (a question is never split: one with more is a group alone), for an
    evaluation that holds one group's windows at a time. A context shared by consecutive
    questions is tokenized once. max_windows: CHUNK_WINDOWS unless given."""
    max_windows = max_windows or CHUNK_WINDOWS
    tokenized, group, n_windows = {}, [], 0
    for question in questions:
        if question.context not in tokenized:
            tokenized[question.context] = vocab.encode_with_spans(question.context)
        n = len(tokenized[question.context][0]) // windowing.doc_stride + 1  # about
        if group and n_windows + n > max_windows:
            yield make_windows(group, vocab, windowing, tokenized=tokenized)
            tokenized = {question.context: tokenized[question.context]}
            group, n_windows = [], 0
        group.append(question)
        n_windows += n
    if group:
        yield make_windows(group, vocab, windowing, tokenized=tokenized)


def count_windows(questions, vocab, windowing):
    """(windows, the question id of every unusable answer, answers) of an evaluation of
    `questions`, counted chunk by chunk (window_chunks)."""
    n_windows, unusable, n_answers = 0, [], 0
    for windows in window_chunks(questions, vocab, windowing):
        n_windows += len(windows)
        unusable += windows.unusable_answers
        n_answers += windows.n_answers
    return n_windows, unusable, n_answers


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


def window_batch(windows, seq_len, index, rows):
    """Batch `index` of an epoch (data.Batches' make_batch): the windows `rows`."""
    return collate(windows, rows, seq_len)
