"""Training equals transformers' own, step for step.

One tiny transformers folder (written by save_pretrained, dropout 0) is fine-tuned twice:
through our scripts, and by a reference loop written with transformers and torch only:
run_qa.py's features (the tokenizer's overflowing windows, padded to max_length),
BertForQuestionAnswering's / BertForMaskedLM's loss, the weight-decay groups of
transformers' Trainer, torch's AdamW, get_linear_schedule_with_warmup (warmup steps
rounded up, as the Trainer does) and clip_grad_norm_. One full batch every step, so that
the order of the windows cannot matter. The loss and the learning rate of every step
must agree to 1e-5 relative.

QA, --span-loss bert: the reference as it is (padding counts in its start/end softmax).
QA, --span-loss masked (the default): the reference with its padding logits set to -inf
before its own cross-entropy. MLM: fixed masks, the Trainer's own optimizer step. GLUE
(glue_task.py; a classification and a regression task): BertForSequenceClassification with
its pretrained pooler and classifier, run_glue.py's features (pairs cut longest-first,
padded to max_seq_length; ours are padded to the longest pair), to 2e-5 relative.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BERT_VOCAB, NOTRE_DAME, REAL_RTE

transformers = pytest.importorskip("transformers")

import glue_task  # noqa: E402
import mlm_task  # noqa: E402
import qa_task  # noqa: E402
from bertkit import (  # noqa: E402
    checkpoint,  # noqa: E402
    transformers_format,  # noqa: E402
)
from bertkit import flags as cli  # noqa: E402
from bertkit.glue import sentences  # noqa: E402
from bertkit.glue import tasks as glue  # noqa: E402
from bertkit.squad import dataset as squad  # noqa: E402
from bertkit.squad.windows import Windowing, collate, make_windows  # noqa: E402
from bertkit.text import tokenizer as tok  # noqa: E402
from bertkit.training import (  # noqa: E402
    distributed,  # noqa: E402
    optimizer,  # noqa: E402
    trainer,  # noqa: E402
)
from model import BertConfig, MLMTask, QuestionAnswerTask, SequenceClassificationTask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_VOCAB = BERT_VOCAB  # real data when there (conftest), else WORDS and synthetic_squad
RTOL = 1e-5
STEPS = 12
# The measured run of the issue: AdamW lr 1e-3, weight decay 0.01, linear with warmup 0.1,
# clip 1.0; windows of BPTT tokens.
LR, WEIGHT_DECAY, WARMUP, CLIP, BPTT, DOC_STRIDE = 1e-3, 0.01, 0.1, 1.0, 128, 64
N_QUESTIONS = 16

# Without the real data: a small vocab.txt and SQuAD-layout data of its words.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "the", "cat", "sat", "on", "mat",
         "who", "where", "did", "what", "dog", "ran", "to", "park", "in", "river", ".", ",", "?"]


def synthetic_squad(seed=0):
    """SQuAD v1.1 JSON of N_QUESTIONS questions about contexts of WORDS, some longer than
    one window."""
    import random

    rng = random.Random(seed)
    nouns = ["cat", "dog", "mat", "park", "river"]
    paragraphs = []
    for p in range(N_QUESTIONS // 2):
        sentences = [f"the {rng.choice(nouns)} {rng.choice(['sat', 'ran'])} "
                     f"{rng.choice(['on', 'to', 'in'])} the {rng.choice(nouns)} ."
                     for _ in range(rng.randrange(4, 30))]
        context = " ".join(sentences)
        qas = []
        for q in range(2):
            answer = rng.choice(nouns)
            start = context.index(f" {answer} ") + 1
            qas.append({"id": f"{p}-{q}", "question": "where did the cat sit ?",
                        "answers": [{"text": answer, "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    return {"data": [{"title": "synthetic", "paragraphs": paragraphs}]}


def pick_questions(data, tokenizer):
    """The first N_QUESTIONS questions of the most common question length (in tokens):
    one length, so that our windows (a new one every DOC_STRIDE context tokens) are
    transformers' (consecutive windows overlapping by a fixed number of tokens)."""
    qas = [(p, qa) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    lengths = [len(tokenizer(qa["question"], add_special_tokens=False)["input_ids"])
               for _, qa in qas]
    common = max(set(lengths), key=lengths.count)
    chosen = [(p, qa) for (p, qa), n in zip(qas, lengths) if n == common][:N_QUESTIONS]
    paragraphs = [{"context": p["context"], "qas": [qa]} for p, qa in chosen]
    return {"data": [{"title": "picked", "paragraphs": paragraphs}]}, common


# Tiny models gain nothing from a second thread, and on a busy machine spinning OpenMP
# threads make the reference loops many times slower.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory):
    """(folder, train file, question length): a tiny random BertForQuestionAnswering with
    its tokenizer, and 16 questions."""
    folder = tmp_path_factory.mktemp("reference")
    if REAL_VOCAB.is_file():
        vocab_file = REAL_VOCAB
    else:
        vocab_file = folder / "vocab.txt"
        vocab_file.write_text("".join(w + "\n" for w in WORDS), encoding="utf-8")
    # from_pretrained on the folder: transformers 5 ignores BertTokenizerFast(vocab_file=...)
    # and builds a 5-token tokenizer.
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(vocab_file.parent))
    assert len(tokenizer) == len(vocab_file.read_text(encoding="utf-8").splitlines())
    data = json.loads(NOTRE_DAME.read_text()) if NOTRE_DAME.is_file() else synthetic_squad()
    data, question_len = pick_questions(data, tokenizer)
    train = folder / "train.json"
    train.write_text(json.dumps(data))
    # The run validates every epoch (one step here): one dev question keeps that short.
    first = data["data"][0]["paragraphs"][0]
    (folder / "dev.json").write_text(json.dumps({"data": [{"title": "dev", "paragraphs": [first]}]}))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=BPTT, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_dir = folder / "qa"
    transformers.BertForQuestionAnswering(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, train, question_len


def their_features(model_dir, train, question_len):
    """run_qa.py's prepare_train_features: overlapping windows padded to max_length, the
    answer's first and last token where the window holds all of it, else [CLS]."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    examples = [(p["context"], qa) for a in json.loads(train.read_text())["data"]
                for p in a["paragraphs"] for qa in p["qas"]]
    # Our windows start every DOC_STRIDE context tokens; theirs overlap by `stride`.
    stride = (BPTT - question_len - 3) - DOC_STRIDE
    enc = tokenizer([qa["question"].lstrip() for _, qa in examples], [c for c, _ in examples],
                    truncation="only_second", max_length=BPTT, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding="max_length")
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        sequence_ids = enc.sequence_ids(i)
        answer = examples[enc["overflow_to_sample_mapping"][i]][1]["answers"][0]
        start_char = answer["answer_start"]
        end_char = start_char + len(answer["text"])
        first = sequence_ids.index(1)
        last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
        if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
            starts.append(0)
            ends.append(0)
            continue
        while first < len(offsets) and offsets[first][0] <= start_char:
            first += 1
        while offsets[last][1] >= end_char:
            last -= 1
        starts.append(first - 1)
        ends.append(last + 1)
    return {"input_ids": torch.tensor(enc["input_ids"]),
            "token_type_ids": torch.tensor(enc["token_type_ids"]),
            "attention_mask": torch.tensor(enc["attention_mask"]),
            "start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}


def our_features(model_dir, train):
    """Our windows of the same questions, as qa_task.py makes them, padded to --bptt."""
    questions, _ = squad.read_squad(train)
    vocab = tok.load_tokenizer(model_dir)
    windows = make_windows(questions, vocab, Windowing(bptt=BPTT, doc_stride=DOC_STRIDE),
                           training=True)
    return collate(windows, torch.arange(len(windows)), BPTT)


def decay_names_of_their_trainer(model):
    """The parameters transformers' Trainer decays (its create_optimizer's groups)."""
    return set(transformers.Trainer.get_decay_parameter_names(None, model))


def reference_steps(model, compute_loss):
    """(losses, lrs) of STEPS full-batch steps of `model`, as transformers' Trainer runs
    them, with transformers and torch only: its decay groups, AdamW, the linear schedule
    with warmup, clip_grad_norm_."""
    decay = decay_names_of_their_trainer(model)
    named = list(model.named_parameters())
    adamw = torch.optim.AdamW(
        [{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
         {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}], lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(
        adamw, math.ceil(WARMUP * STEPS), STEPS)
    losses, lrs = [], []
    for _ in range(STEPS):
        loss = compute_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        losses.append(loss.item())
        lrs.append(schedule.get_last_lr()[0])
        adamw.step()
        schedule.step()
        adamw.zero_grad()
    return losses, lrs


def reference_qa_run(model_dir, features, mask_padding):
    """(losses, lrs) of the QA fine-tuning, transformers and torch only."""
    model = transformers.BertForQuestionAnswering.from_pretrained(model_dir).train()

    def compute_loss(model):
        out = model(**features)
        if not mask_padding:
            return out.loss
        real = features["attention_mask"].bool()
        ce = torch.nn.functional.cross_entropy
        return (ce(out.start_logits.masked_fill(~real, -math.inf), features["start_positions"])
                + ce(out.end_logits.masked_fill(~real, -math.inf),
                     features["end_positions"])) / 2

    return reference_steps(model, compute_loss)


def our_qa_run(model_dir, train, n_windows, span_loss, tmp_path, monkeypatch):
    """(losses, lrs) of STEPS steps of qa_task.py (its flags, its main, in this process),
    from its metrics log: one epoch is one step (every window in one batch)."""
    metrics = tmp_path / f"{span_loss}.jsonl"
    argv = list(map(str, [
        "--bert-model", model_dir, "--train-file", train, "--dev-file", train.parent / "dev.json",
        "--device", "cpu", "--bptt", BPTT, "--doc-stride", DOC_STRIDE,
        "--batch_size", n_windows, "--epochs", STEPS, "--optimizer", "adamw", "--lr", LR,
        "--weight-decay", WEIGHT_DECAY, "--schedule", "linear", "--warmup", WARMUP,
        "--clip", CLIP, "--span-loss", span_loss, "--log-interval", 1,
        "--metrics-file", metrics, "--save", tmp_path / "qa.pt",
        "--state-file", tmp_path / "state.pt", "--predictions", tmp_path / "p.json",
        "--save-vocab", tmp_path / "v.pt", "--no-progress"]))
    monkeypatch.chdir(tmp_path)  # the loss log is written to the working folder
    monkeypatch.setattr("signal.signal", lambda *a: None)  # no SIGTERM handler left behind
    qa_task.main(cli.parse_args(qa_task.get_parser(), argv), distributed.DistInfo())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows], [row["lr"] for row in rows]


def assert_same_steps(ours, theirs, rtol=RTOL):
    """Losses and lrs of every step agree to `rtol` relative."""
    for name, got, expected in zip(("loss", "lr"), ours, theirs):
        assert len(got) == len(expected) == STEPS
        for step, (a, b) in enumerate(zip(got, expected), start=1):
            assert abs(a - b) <= rtol * abs(b), f"{name} of step {step}: ours {a}, theirs {b}"


def test_our_windows_are_run_qa_features(qa_setup):
    model_dir, train, question_len = qa_setup
    theirs, ours = their_features(model_dir, train, question_len), our_features(model_dir, train)
    assert len(ours["inputs"]) > N_QUESTIONS  # some contexts need more than one window
    assert int((ours["start_positions"] == 0).sum()) > 0  # windows without the answer
    torch.testing.assert_close(ours["inputs"], theirs["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours["token_types"], theirs["token_type_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours["padding_mask"], theirs["attention_mask"].bool(), rtol=0, atol=0)
    torch.testing.assert_close(ours["start_positions"], theirs["start_positions"], rtol=0, atol=0)
    torch.testing.assert_close(ours["end_positions"], theirs["end_positions"], rtol=0, atol=0)


def test_weight_decay_groups_are_transformers_trainers(qa_setup):
    model_dir = qa_setup[0]
    ckpt = checkpoint.load_checkpoint(str(model_dir), "--bert-model")
    ours = QuestionAnswerTask(BertConfig.from_dict(ckpt["config"]))
    assert_decay_groups_are_their_trainers(
        ours, transformers.BertForQuestionAnswering.from_pretrained(model_dir))


def assert_decay_groups_are_their_trainers(ours, theirs):
    names = {id(p): n for n, p in ours.named_parameters()}
    groups = optimizer.param_groups(ours, WEIGHT_DECAY)
    decayed = {their for p in groups[0]["params"]
               for their in transformers_format.transformers_names(names[id(p)])}
    not_decayed = {their for p in groups[1]["params"]
                   for their in transformers_format.transformers_names(names[id(p)])}
    their_decay = decay_names_of_their_trainer(theirs)
    assert decayed == their_decay
    assert not_decayed == {n for n, _ in theirs.named_parameters()} - their_decay


@pytest.fixture(scope="module")
def references(qa_setup):
    """{--span-loss: (features, the reference's (losses, lrs))}: transformers with its
    padding logits masked for "masked", as it is for "bert"."""
    model_dir, train, question_len = qa_setup
    features = their_features(model_dir, train, question_len)
    return features, {mode: reference_qa_run(model_dir, features, mask_padding=mode == "masked")
                      for mode in ("masked", "bert")}


@pytest.mark.parametrize("span_loss", ["masked", "bert"])
def test_qa_fine_tuning_equals_transformers_step_for_step(qa_setup, references, tmp_path,
                                                          monkeypatch, span_loss):
    model_dir, train, _ = qa_setup
    features, runs = references
    ours = our_qa_run(model_dir, train, len(features["input_ids"]), span_loss, tmp_path,
                      monkeypatch)
    print(span_loss, "max relative loss difference",
          max(abs(a - b) / abs(b) for a, b in zip(ours[0], runs[span_loss][0])))
    assert_same_steps(ours, runs[span_loss])
    # The two modes are different losses: the other reference is far away (about 1%).
    other = runs["bert" if span_loss == "masked" else "masked"][0]
    assert abs(ours[0][0] - other[0]) > 1e-3 * abs(other[0])


def test_a_recipe_run_prints_its_settings_and_continues_the_folders_head(
        qa_setup, tmp_path, monkeypatch, capsys):
    """--recipe bert from the QA folder: the effective settings first (the flag given, --bptt
    128 for this tiny model's 128 positions, winning), then a run of the recipe's settings
    that starts from the folder's own QA head, as the equality above needs."""
    model_dir, train, _ = qa_setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    args = cli.parse_args(qa_task.get_parser(), list(map(str, [
        "--recipe", "bert", "--bert-model", model_dir, "--train-file", train,
        "--dev-file", train.parent / "dev.json", "--device", "cpu", "--bptt", BPTT,
        "--max-steps", 1, "--log-interval", 1, "--save", tmp_path / "qa.pt",
        "--state-file", tmp_path / "state.pt", "--predictions", tmp_path / "p.json",
        "--metrics-file", tmp_path / "m.jsonl", "--save-vocab", tmp_path / "v.pt",
        "--no-progress"])))
    qa_task.main(args, distributed.DistInfo())
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("--recipe bert: --optimizer adamw --lr 3e-05 --weight-decay 0.01 "
                            "--schedule linear --warmup 0.1 --clip 1.0 --epochs 2 --bptt 128 "
                            "--doc-stride 128 --span-loss bert --batch_size 32 --grad-accum 1 "
                            "(a global batch of 32 sequences over 1 process(es)), dropout 0.0 "
                            "(--bert-model's)"), first
    assert first.endswith("given on the command line: --bptt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["args"]["recipe"] == "bert" and state["args"]["global_batch"] == 32
    # The head the run started from is the folder's: one step at lr 0 (warmup) moves nothing.
    theirs = transformers.BertForQuestionAnswering.from_pretrained(model_dir).state_dict()
    torch.testing.assert_close(state["model"]["qa_span.weight"], theirs["qa_outputs.weight"],
                               rtol=0, atol=0)


###############################################################################
# MLM
###############################################################################


class FixedBatch:
    """A task for the Trainer whose one batch (fixed masks) is the whole epoch."""

    best_metric = ("loss", "min")

    def __init__(self, batch, config, vocab):
        self.batch, self.config, self.vocab = batch, config, vocab

    def train_batches(self, epoch):
        return [self.batch]

    loss = staticmethod(mlm_task.MLM.mlm_loss)


def test_mlm_training_equals_transformers_step_for_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        tie_word_embeddings=False)  # our decoder is a matrix of its own (README)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    (tmp_path / "mlm" / "vocab.txt").write_text("".join(w + "\n" for w in WORDS))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "mlm"), "--bert-model")
    assert ckpt["kind"] == "mlm"
    ours = MLMTask(BertConfig.from_dict(ckpt["config"]))
    ours.load_state_dict(ckpt["model"])
    # 8 rows of 24 tokens, 4 masked per row ([MASK] in the input), as mlm_batch gives them.
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, len(WORDS), (8, 24), generator=g)
    tokens[:, 0] = 2  # [CLS]
    masked_positions = torch.rand(8, 23, generator=g).topk(4, dim=1).indices.sort(1).values + 1
    inputs = tokens.scatter(1, masked_positions, 4)
    targets = tokens.gather(1, masked_positions).flatten()
    labels = torch.full_like(tokens, -100).scatter(1, masked_positions,
                                                   tokens.gather(1, masked_positions))
    vocab = tok.load_tokenizer(tmp_path / "mlm")
    task = FixedBatch({"inputs": inputs, "masked_positions": masked_positions,
                       "targets": targets}, ours.bert_model.config, vocab)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    train_config = trainer.TrainConfig(
        lr=LR, clip=CLIP, epochs=STEPS, batch_size=8, seed=0, log_interval=1,
        state_file=str(tmp_path / "s.pt"), metrics_file=str(tmp_path / "m.jsonl"),
        optimizer="adamw", schedule="linear", weight_decay=WEIGHT_DECAY, warmup=WARMUP)
    loop = trainer.Trainer(task, ours, train_config, distributed.DistInfo(),
                           torch.device("cpu"), lambda *a: None)
    our_losses, our_lrs = [], []
    for _ in range(STEPS):
        our_losses.append(loop.step([task.batch]).item())
        our_lrs.append(loop.step_lr)

    theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path / "mlm").train()
    their_losses, their_lrs = reference_steps(
        theirs, lambda model: model(input_ids=inputs, labels=labels).loss)
    print("mlm max relative loss difference",
          max(abs(a - b) / abs(b) for a, b in zip(our_losses, their_losses)))
    assert_same_steps((our_losses, our_lrs), (their_losses, their_lrs))
    assert their_losses[-1] < their_losses[0] - 0.1  # it trained: the steps did something


###############################################################################
# GLUE: sequence classification and regression
###############################################################################

GLUE_RTOL = 2e-5
N_PAIRS = 16


def glue_pairs(seed=0):
    """(sentence1, sentence2) pairs: RTE's first training pairs (some longer than BPTT
    tokens together) when the real data is there, else sentences of WORDS."""
    rte = REAL_RTE / "train.tsv"
    if rte.is_file():
        rows = [line.split("\t") for line in rte.read_text(encoding="utf-8").splitlines()[1:]]
        return [(a, b) for _, a, b, _ in rows[:N_PAIRS]]
    import random

    rng = random.Random(seed)
    words = WORDS[31:]
    return [(" ".join(rng.choices(words, k=rng.randrange(4, 90))),
             " ".join(rng.choices(words, k=rng.randrange(2, 60)))) for _ in range(N_PAIRS)]


@pytest.fixture(scope="module", params=["classification", "regression"])
def glue_setup(request, tmp_path_factory):
    """(folder of a tiny BertForSequenceClassification and its tokenizer, data dir, task,
    labels): RTE's labels (entailment, not_entailment) or STS-B's scores, N_PAIRS training
    pairs in the task's GLUE layout and 4 dev pairs."""
    regression = request.param == "regression"
    task = glue.TASKS["STS-B" if regression else "RTE"]
    folder = tmp_path_factory.mktemp(f"glue-{request.param}")
    if REAL_VOCAB.is_file():
        vocab_file = REAL_VOCAB
    else:
        vocab_file = folder / "vocab.txt"
        vocab_file.write_text("".join(w + "\n" for w in WORDS), encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab_file))
    g = torch.Generator().manual_seed(2)
    pairs = glue_pairs()
    labels = ([round(float(x), 3) for x in torch.rand(N_PAIRS, generator=g) * 5] if regression
              else [task.labels[int(i)] for i in torch.randint(2, (N_PAIRS,), generator=g)])
    data = folder / "data" / "glue" / task.name
    data.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\t" + ("score" if regression else "label")
    for name, rows in (("train.tsv", range(N_PAIRS)), ("dev.tsv", range(4))):
        (data / name).write_text("\n".join([header] + [
            f"{i}\t{pairs[i][0]}\t{pairs[i][1]}\t{labels[i]}" for i in rows]) + "\n")
    torch.manual_seed(0)
    names = ["LABEL_0"] if regression else list(task.labels)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=BPTT, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        problem_type="regression" if regression else "single_label_classification")
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # a pretrained pooler and classifier: not their initial values
        for p in (*model.bert.pooler.parameters(), *model.classifier.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", folder / "data", task, labels


def their_glue_features(model_dir, data_dir, task, labels):
    """run_glue.py's features: the pair cut longest-first to max_seq_length, padded to it
    (its default, pad_to_max_length); label ids in the task's order, or the scores."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = [line.split("\t") for line in
            (data_dir / "glue" / task.name / "train.tsv").read_text().splitlines()[1:]]
    enc = tokenizer([r[1] for r in rows], [r[2] for r in rows], truncation=True,
                    max_length=BPTT, padding="max_length", return_tensors="pt")
    if task.is_regression:
        enc["labels"] = torch.tensor([float(x) for x in labels])
    else:
        enc["labels"] = torch.tensor([task.labels.index(x) for x in labels])
    return dict(enc)


def test_our_pair_rows_are_run_glue_features(glue_setup):
    model_dir, data_dir, task, labels = glue_setup
    theirs = their_glue_features(model_dir, data_dir, task, labels)
    examples = glue.read_task_file(data_dir / "glue" / task.name / "train.tsv", task, "train")
    vocab = tok.load_tokenizer(model_dir)
    encoded = sentences.encode(examples.texts_a, examples.texts_b, vocab, BPTT)
    ours = sentences.pair_batch(encoded, None, vocab.pad_id, 0, torch.arange(N_PAIRS), BPTT)
    if REAL_VOCAB.is_file():
        assert encoded.truncated > 0  # some pairs are cut to BPTT tokens
    torch.testing.assert_close(ours["inputs"], theirs["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours["token_types"], theirs["token_type_ids"], rtol=0, atol=0)
    torch.testing.assert_close(ours["padding_mask"], theirs["attention_mask"].bool(), rtol=0,
                               atol=0)


def our_glue_run(model_dir, data_dir, task, tmp_path, monkeypatch):
    """(losses, lrs) of STEPS steps of glue_task.py, from its metrics log: every training
    pair in one batch, one step an epoch."""
    metrics = tmp_path / "glue.jsonl"
    argv = list(map(str, [
        "--bert-model", model_dir, "--task", task.name, "--data-dir", data_dir,
        "--device", "cpu", "--bptt", BPTT, "--batch_size", N_PAIRS, "--epochs", STEPS,
        "--optimizer", "adamw", "--lr", LR, "--weight-decay", WEIGHT_DECAY,
        "--schedule", "linear", "--warmup", WARMUP, "--clip", CLIP, "--log-interval", 1,
        "--metrics-file", metrics, "--save", tmp_path / "glue.pt",
        "--state-file", tmp_path / "state.pt", "--predictions", tmp_path / "p.tsv",
        "--save-vocab", tmp_path / "v.pt", "--no-progress"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    glue_task.main(cli.parse_args(glue_task.get_parser(), argv), distributed.DistInfo())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows], [row["lr"] for row in rows]


def test_glue_weight_decay_groups_are_transformers_trainers(glue_setup):
    model_dir = glue_setup[0]
    ckpt = checkpoint.load_checkpoint(str(model_dir), "--bert-model")
    ours = SequenceClassificationTask(BertConfig.from_dict(ckpt["config"]),
                                      len(ckpt["model"]["classifier.weight"]))
    assert_decay_groups_are_their_trainers(
        ours, transformers.BertForSequenceClassification.from_pretrained(model_dir))


def test_glue_fine_tuning_equals_transformers_step_for_step(glue_setup, tmp_path, monkeypatch,
                                                            capsys):
    """BertForSequenceClassification with its pretrained pooler and classifier, fine-tuned
    by glue_task.py and by the reference loop: every loss and lr agree to 2e-5."""
    model_dir, data_dir, task, labels = glue_setup
    ours = our_glue_run(model_dir, data_dir, task, tmp_path, monkeypatch)
    assert "pooler and classifier (a classifier of the same labels)" in capsys.readouterr().out
    features = their_glue_features(model_dir, data_dir, task, labels)
    theirs = transformers.BertForSequenceClassification.from_pretrained(model_dir).train()
    reference = reference_steps(theirs, lambda model: model(**features).loss)
    print(task.name, "max relative loss difference",
          max(abs(a - b) / abs(b) for a, b in zip(ours[0], reference[0])),
          "lr", max(abs(a - b) / abs(b) for a, b in zip(ours[1], reference[1]) if b))
    assert_same_steps(ours, reference, GLUE_RTOL)
    assert reference[0][-1] < reference[0][0] * 0.9  # it trained: the steps did something
