"""convert.py: transformers BERT folders in (checkpoint.load_checkpoint) and out (export).

Folders are written by transformers' own save_pretrained from tiny random models (no
downloads); the weights are perturbed so that no parameter can hide behind its initial
value. transformers is a test dependency only: without it the module is skipped.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BERT_VOCAB, NOTRE_DAME, real_data_skip

transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
from bertkit import (  # noqa: E402
    checkpoint,  # noqa: E402
    transformers_format,  # noqa: E402
)
from bertkit import flags as cli  # noqa: E402
from bertkit.text import tokenizer as tok  # noqa: E402
from model import (  # noqa: E402
    BertConfig,
    MLMTask,
    NextSentenceTask,
    QuestionAnswerTask,
    SequenceClassificationTask,
)

ATOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A WordPiece vocabulary small enough for a tiny model: specials, letters, some words.
WORDS = WORDPIECE_SPECIALS + list("abcdefghijklmnopqrstuvwxyz") + [
    f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + [
    "the", "cat", "sat", "on", "mat", "who", "where", "did", "what", ".", ",", "?"]
def perturb(model):
    """Non-default values everywhere (LayerNorm weights are 1 and biases 0 at init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def their_model(cls, tie_word_embeddings=True, **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                  pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = transformers.BertConfig(**{**fields, **overrides},
                                     tie_word_embeddings=tie_word_embeddings)
    kwargs = {"add_pooling_layer": False} if cls is transformers.BertModel else {}
    return perturb(cls(config, **kwargs))


def write_vocab(folder):
    Path(folder, "vocab.txt").write_text("".join(w + "\n" for w in WORDS), encoding="utf-8")


def save_their(model, folder, weights="safetensors", prefix=None):
    """`model` as a transformers folder: save_pretrained's, or config.json plus a
    pytorch_model.bin (weights="bin"), optionally with every name under `prefix`."""
    folder = Path(folder)
    if weights == "safetensors" and prefix is None:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        state = {(prefix or "") + k: v for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    write_vocab(folder)
    return folder


def batch(config_vocab_size, seq=12, rows=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config_vocab_size, (rows, seq), generator=g)
    ids[1, 8:] = 0  # padding ([PAD] is 0)
    types = torch.zeros_like(ids)
    types[:, 6:8] = 1
    return ids, types, ids.ne(0)


def assert_same_outputs(ours, theirs):
    """Our module and transformers' model give the same outputs (1e-5) on a padded batch:
    start and end logits, MLM logits at every real position, NS logits, or hidden states."""
    ids, types, real = batch(len(WORDS))
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=real.long())
        if isinstance(ours, QuestionAnswerTask):
            pairs = zip(ours(ids, types, real), (out.start_logits, out.end_logits), strict=True)
        elif isinstance(ours, MLMTask):
            logits = out.prediction_logits if "prediction_logits" in out else out.logits
            pairs = [(ours(ids, None, types, real), logits)]
        elif isinstance(ours, SequenceClassificationTask):  # NextSentenceTask too
            torch.testing.assert_close(ours(ids, types, real), out.logits, atol=ATOL, rtol=0)
            return
        else:
            pairs = [(ours(ids, types, real), out.last_hidden_state)]
    # Padded positions are garbage in both (nobody reads them): compare the real ones.
    for got, expected in pairs:
        torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def ours_from(folder):
    ckpt = checkpoint.load_checkpoint(str(folder), "--bert-model")
    n_labels = len(ckpt["model"]["classifier.weight"]) if ckpt["kind"] == "glue" else None
    model = transformers_format.new_model(ckpt["kind"], BertConfig.from_dict(ckpt["config"]),
                                          n_labels)
    model.load_state_dict(ckpt["model"], strict=True)
    return ckpt, model.eval()


###############################################################################
# In
###############################################################################


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_transformers_qa_model_answers_the_same_through_ours(tmp_path, weights):
    theirs = their_model(transformers.BertForQuestionAnswering)
    ckpt, ours = ours_from(save_their(theirs, tmp_path, weights))
    assert ckpt["kind"] == "qa" and ckpt["config"]["qa_gelu"] is False
    assert ckpt["vocab"] == WORDS and ckpt["dropped"] == []
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("cls, tied, weights", [
    (transformers.BertForMaskedLM, True, "safetensors"),  # decoder tied: not in the file
    (transformers.BertForMaskedLM, False, "safetensors"),
    (transformers.BertForMaskedLM, True, "bin"),  # .bin holds the tied copies too
    (transformers.BertForPreTraining, True, "safetensors"),
])
def test_transformers_mlm_models_give_the_same_logits_through_ours(tmp_path, cls, tied, weights):
    theirs = their_model(cls, tie_word_embeddings=tied)
    folder = save_their(theirs, tmp_path, weights)
    if tied and weights == "safetensors":
        from safetensors.torch import load_file

        assert "cls.predictions.decoder.weight" not in load_file(folder / "model.safetensors")
    ckpt, ours = ours_from(folder)
    assert ckpt["kind"] == "mlm"
    pretraining = cls is transformers.BertForPreTraining
    # Our MLMTask has no pooler or next-sentence head: the pooler is kept beside it (a
    # classifier fine-tuned from the folder starts from it), the head reported as dropped.
    assert ckpt["dropped"] == (["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
                               if pretraining else [])
    assert ("pooler" in ckpt) == pretraining
    if pretraining:
        assert_pooler_is_theirs(ckpt, theirs)
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("weights, prefix", [("safetensors", None), ("bin", None),
                                              ("bin", "bert.")])
def test_transformers_encoder_gives_the_same_output_through_ours(tmp_path, weights, prefix):
    # BertModel saves its names bare ("embeddings.…"); some files put them under "bert.".
    theirs = their_model(transformers.BertModel)
    ckpt, ours = ours_from(save_their(theirs, tmp_path, weights, prefix))
    assert ckpt["kind"] == "encoder" and ckpt["dropped"] == []
    assert_same_outputs(ours, theirs)


def test_transformers_next_sentence_model_gives_the_same_logits_through_ours(tmp_path):
    theirs = their_model(transformers.BertForNextSentencePrediction)
    ckpt, ours = ours_from(save_their(theirs, tmp_path))
    assert ckpt["kind"] == "ns"
    assert_same_outputs(ours, theirs)


def assert_pooler_is_theirs(ckpt, theirs):
    """A classifier started from `ckpt` (as glue_task.py starts one) pools <cls> as the
    transformers model it came from: its pretrained pooler, not a new one."""
    start = checkpoint.starting_weights(ckpt, "glue", "folder")
    assert start.part == "encoder" and start.pooler is not None
    ours = checkpoint.task_model(SequenceClassificationTask, BertConfig.from_dict(ckpt["config"]),
                                 start, "folder", torch.device("cpu"), n_labels=2).eval()
    ids, types, real = batch(len(WORDS))
    base = theirs.bert if hasattr(theirs, "bert") else theirs
    with torch.no_grad():
        expected = base(input_ids=ids, token_type_ids=types,
                        attention_mask=real.long()).pooler_output
        got = torch.tanh(ours.pooler(ours.bert_model(ids, types, real)[:, 0]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_transformers_encoder_with_pooler_keeps_it(tmp_path):
    torch.manual_seed(0)
    theirs = perturb(transformers.BertModel(their_model(transformers.BertModel).config))
    ckpt, ours = ours_from(save_their(theirs, tmp_path))
    assert ckpt["kind"] == "encoder" and ckpt["dropped"] == []
    assert sorted(ckpt["pooler"]) == ["bias", "weight"]
    assert_same_outputs(ours, theirs)
    assert_pooler_is_theirs(ckpt, theirs)
    # Written back out, the folder is a BertModel with its pooler: nothing missing.
    convert.main([str(tmp_path), str(tmp_path / "out")])
    again = load_theirs(transformers.AutoModel, tmp_path / "out")
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_transformers_next_sentence_model_gives_its_pooler(tmp_path):
    theirs = their_model(transformers.BertForNextSentencePrediction)
    ckpt = checkpoint.load_checkpoint(str(save_their(theirs, tmp_path)), "--bert-model")
    assert ckpt["kind"] == "ns" and "pooler" not in ckpt  # the pooler is the model's own
    assert_pooler_is_theirs(ckpt, theirs)


@pytest.mark.parametrize("labels", [["contradiction", "entailment", "neutral"], None])
def test_transformers_sequence_classifier_is_read_with_its_labels(tmp_path, labels):
    """A BertForSequenceClassification folder (as run_glue writes it: id2label, problem_type,
    finetuning_task) reads as our "glue" checkpoint, label names in id order, the same
    logits; one output with problem_type regression has labels None."""
    n = 1 if labels is None else len(labels)
    names = labels or ["LABEL_0"]
    theirs = their_model(transformers.BertForSequenceClassification, num_labels=n,
                         id2label=dict(enumerate(names)), finetuning_task="mnli",
                         problem_type="single_label_classification" if labels else "regression")
    ckpt, ours = ours_from(save_their(theirs, tmp_path))
    assert ckpt["kind"] == "glue" and ckpt["labels"] == labels and ckpt["task"] == "mnli"
    assert ckpt["dropped"] == [] and "pooler" not in ckpt
    assert_same_outputs(ours, theirs)
    assert checkpoint.starting_weights(ckpt, "glue", "f").labels == labels


def test_a_multi_label_classifier_is_refused(tmp_path):
    theirs = their_model(transformers.BertForSequenceClassification, num_labels=3,
                         problem_type="multi_label_classification")
    with pytest.raises(checkpoint.UserError, match="picks one label per example"):
        checkpoint.load_checkpoint(str(save_their(theirs, tmp_path)), "--model")


def test_a_cache_snapshot_folder_of_links_is_read(tmp_path):
    # The transformers cache keeps files under blobs/ and links them from snapshots/<hash>/.
    theirs = their_model(transformers.BertForQuestionAnswering)
    saved = save_their(theirs, tmp_path / "saved")
    blobs = tmp_path / "models--tiny" / "blobs"
    snapshot = tmp_path / "models--tiny" / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(saved.iterdir())):
        path.rename(blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    _, ours = ours_from(snapshot)
    assert_same_outputs(ours, theirs)


def test_old_layernorm_names_are_read(tmp_path):
    # Early TensorFlow conversions (bert-base-uncased's own files) name LayerNorm's
    # parameters gamma and beta; transformers reads them as weight and bias.
    theirs = their_model(transformers.BertModel)
    theirs.config.save_pretrained(tmp_path)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta"): v
             for k, v in theirs.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    write_vocab(tmp_path)
    _, ours = ours_from(tmp_path)
    assert_same_outputs(ours, theirs)


def edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("change, expected", [
    (None, "no config.json"),
    ({"model_type": "roberta"}, "model_type 'roberta'"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"is_decoder": True}, "is_decoder True"),
    ({"intermediate_size": 65},
     "bert.encoder.layer.0.intermediate.dense.weight has shape [64, 32], its config.json "
     "implies [65, 32]"),
    ({"num_attention_heads": 5}, "not divisible"),
])
def test_folders_we_cannot_represent_are_refused_in_one_line(tmp_path, capsys, change, expected):
    folder = save_their(their_model(transformers.BertForQuestionAnswering), tmp_path / "m")
    if change is None:
        (folder / "config.json").unlink()
    else:
        edit_config(folder, **change)
    capsys.readouterr()  # transformers' own progress output while saving
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(folder), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CHECKPOINT ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_folder_without_weights_is_refused(tmp_path):
    folder = save_their(their_model(transformers.BertModel), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(checkpoint.UserError, match="no model.safetensors or pytorch_model.bin"):
        checkpoint.load_checkpoint(str(folder), "--bert-model")


def test_a_pickle_payload_in_pytorch_model_bin_is_one_error_line_and_never_runs(
        tmp_path, capsys):
    """A folder whose only weights are a pytorch_model.bin holding objects torch's
    weights_only loading refuses (an UnpicklingError): exit 2, one line; nothing run."""
    folder = save_their(their_model(transformers.BertModel), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(str(marker)))
    (folder / "pytorch_model.bin").write_bytes(payload)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(folder), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: CHECKPOINT {folder}: its pytorch_model.bin does not load as "
                          "a state dict of tensors (torch.load(weights_only=True): "
                          "UnpicklingError)")
    assert not marker.exists() and not (tmp_path / "out").exists()


class Payload:
    """An object whose unpickling would run a command (touch a file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("inside", [False, True])
def test_force_never_replaces_a_folder_that_holds_its_input(tmp_path, capsys, inside):
    """convert.py run/glue_model.pt run --force would delete its own input; so would a
    transformers folder converted over itself."""
    ckpt, _ = our_checkpoint(tmp_path, "qa", QuestionAnswerTask)
    run = tmp_path / "run"
    run.mkdir()
    if inside:
        source = run / "qa_model.pt"
        torch.save(ckpt, source)
    else:
        source = export_to(tmp_path, ckpt)
        run = source
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(source), str(run), "--force"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: OUT_DIR {run} holds CHECKPOINT {source}: writing {run} "
                          "would replace that input; give another OUT_DIR")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_folder_is_no_state_file(tmp_path):
    import qa_task

    folder = save_their(their_model(transformers.BertModel), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(qa_task.get_parser(), ["--checkpoint", str(folder)])
    assert exit_info.value.code == 2


###############################################################################
# Out
###############################################################################


def tiny_config(**overrides):
    fields = dict(vocab_size=len(WORDS), emsize=32, nhead=2, nhid=64, nlayers=2, dropout=0.0,
                  max_len=64, pad_id=0)
    return BertConfig(**{**fields, **overrides})


def our_checkpoint(tmp_path, kind, module, tokenizer="wordpiece", head=None, **overrides):
    """A checkpoint dict as our scripts save it, of a perturbed random `module` (`head`:
    a classifier's label names, a list or None)."""
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    if kind == "glue":
        model = perturb(module(config, 1 if head is None else len(head)))
    else:
        model = perturb(module(config))
    ckpt = {"kind": kind, "model": model.state_dict(), "config": config.to_dict()}
    if kind == "glue":
        ckpt.update(labels=head, task="RTE" if head else "STS-B", bptt=64)
    if tokenizer == "wordpiece":
        write_vocab(tmp_path)
        ckpt.update(vocab=WORDS, tokenizer=tok.load_tokenizer(tmp_path / "vocab.txt").state())
    else:  # as written before checkpoints stored a tokenizer
        ckpt.update(vocab=list(tok.SPECIALS) + WORDS[5:])
    return ckpt, model


def export_to(tmp_path, ckpt, name="out"):
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    convert.main([str(path), str(tmp_path / name)])
    return tmp_path / name


def load_theirs(auto, folder, heads_left_out=False, **kwargs):
    """`auto`.from_pretrained(folder), which must find every weight it needs and, unless
    it is a base model reading a folder with heads, use every weight there."""
    model, info = auto.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert heads_left_out or not info["unexpected_keys"], info
    return model.eval()


def test_exported_mlm_model_loads_in_transformers_with_our_logits(tmp_path, capsys):
    ckpt, ours = our_checkpoint(tmp_path, "mlm", MLMTask)
    folder = export_to(tmp_path, ckpt)
    out = capsys.readouterr().out
    assert "BertForMaskedLM" in out and "AutoModelForMaskedLM.from_pretrained" in out
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["tie_word_embeddings"] is False
    assert config["hidden_act"] == "gelu" and config["pad_token_id"] == 0
    assert_same_outputs(ours, load_theirs(transformers.AutoModelForMaskedLM, folder))


def test_exported_qa_model_loads_in_transformers_with_our_logits(tmp_path):
    ckpt, ours = our_checkpoint(tmp_path, "qa", QuestionAnswerTask)
    folder = export_to(tmp_path, ckpt)
    assert_same_outputs(ours, load_theirs(transformers.AutoModelForQuestionAnswering, folder))


def test_exported_ns_model_loads_in_transformers_with_our_logits(tmp_path):
    ckpt, ours = our_checkpoint(tmp_path, "ns", NextSentenceTask)
    folder = export_to(tmp_path, ckpt)
    assert_same_outputs(ours, load_theirs(transformers.AutoModelForNextSentencePrediction, folder))
    # AutoModel finds its encoder and pooler there, nothing missing.
    encoder = load_theirs(transformers.AutoModel, folder, heads_left_out=True)
    assert_same_outputs(ours.bert_model, encoder)


@pytest.mark.parametrize("labels", [["entailment", "not_entailment"], None])
def test_exported_classifier_loads_in_transformers_with_our_logits_and_labels(
        tmp_path, capsys, labels):
    """glue_model.pt -> a BertForSequenceClassification folder: nothing missing, our label
    names both ways, problem_type set, the same logits; transformers' text-classification
    pipeline answers with our label and probability (the value itself for regression)."""
    ckpt, ours = our_checkpoint(tmp_path, "glue", SequenceClassificationTask, head=labels)
    folder = export_to(tmp_path, ckpt)
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    theirs = load_theirs(transformers.AutoModelForSequenceClassification, folder)
    names = labels or ["LABEL_0"]
    assert theirs.config.id2label == dict(enumerate(names))
    assert theirs.config.label2id == {n: i for i, n in enumerate(names)}
    assert theirs.config.problem_type == ("single_label_classification" if labels
                                          else "regression")
    assert theirs.config.finetuning_task == ckpt["task"]
    assert_same_outputs(ours, theirs)
    pipe = transformers.pipeline("text-classification", model=str(folder), device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for a, b in [("the cat sat", "on the mat"), ("who sat ?", "the cat")]:
        got = pipe({"text": a, "text_pair": b})
        got = got[0] if isinstance(got, list) else got
        enc = tokenizer(a, b, return_tensors="pt")
        with torch.no_grad():
            logits = ours(enc["input_ids"], enc["token_type_ids"])[0]
        if labels is None:
            assert got["label"] == "LABEL_0"
            assert got["score"] == pytest.approx(float(logits[0]), abs=1e-5)
        else:
            assert got["label"] == labels[int(logits.argmax())]
            assert got["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)


def test_export_then_import_keeps_a_classifiers_labels_bitwise(tmp_path):
    ckpt, _ = our_checkpoint(tmp_path, "glue", SequenceClassificationTask,
                             head=["contradiction", "entailment", "neutral"])
    again = checkpoint.load_checkpoint(str(export_to(tmp_path, ckpt)), "--model")
    assert again["kind"] == "glue" and again["labels"] == ckpt["labels"]
    assert again["task"] == "RTE"
    for key, value in ckpt["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_exported_encoder_with_pooler_loads_in_transformers_with_it(tmp_path, capsys):
    """ns_bert.pt holds ns_task.py's pooler beside the encoder: the export is a BertModel
    with that pooler, which transformers loads with nothing missing."""
    ckpt, model = our_checkpoint(tmp_path, "ns", NextSentenceTask)
    encoder = {"kind": "encoder", "model": model.bert_model.state_dict(),
               "pooler": model.linear_layer.state_dict(),
               **{k: ckpt[k] for k in ("config", "vocab", "tokenizer")}}
    folder = export_to(tmp_path, encoder)
    out = capsys.readouterr().out
    assert "AutoModel.from_pretrained" in out and "add_pooling_layer" not in out
    theirs = load_theirs(transformers.AutoModel, folder)
    assert_same_outputs(model.bert_model, theirs)
    ids, types, real = batch(len(WORDS))
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=types, attention_mask=real.long())
        pooled = torch.tanh(model.linear_layer(model.bert_model(ids, types, real)[:, 0]))
    torch.testing.assert_close(pooled, expected.pooler_output, atol=ATOL, rtol=0)
    again = checkpoint.load_checkpoint(str(folder), "--bert-model")
    assert all(torch.equal(again["pooler"][k], v) for k, v in encoder["pooler"].items())


def test_exported_encoder_loads_in_transformers_without_pooler(tmp_path, capsys):
    ckpt, model = our_checkpoint(tmp_path, "mlm", MLMTask)
    encoder = {"kind": "encoder", "model": model.bert_model.state_dict(),
               **{k: ckpt[k] for k in ("config", "vocab", "tokenizer")}}
    folder = export_to(tmp_path, encoder)
    assert "add_pooling_layer=False" in capsys.readouterr().out
    theirs = load_theirs(transformers.AutoModel, folder, add_pooling_layer=False)
    assert_same_outputs(model.bert_model, theirs)


@pytest.mark.parametrize("cls", [transformers.BertForQuestionAnswering,
                                 transformers.BertForMaskedLM, transformers.BertModel])
def test_import_then_export_round_trips_bitwise(tmp_path, cls):
    save_their(their_model(cls), tmp_path / "theirs")
    first = checkpoint.load_checkpoint(str(tmp_path / "theirs"), "--bert-model")
    convert.main([str(tmp_path / "theirs"), str(tmp_path / "ours")])
    again = checkpoint.load_checkpoint(str(tmp_path / "ours"), "--bert-model")
    assert again["kind"] == first["kind"] and again["config"] == first["config"]
    assert again["model"].keys() == first["model"].keys()
    for key, value in first["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_export_then_import_round_trips_bitwise(tmp_path):
    ckpt, _ = our_checkpoint(tmp_path, "mlm", MLMTask)
    again = checkpoint.load_checkpoint(str(export_to(tmp_path, ckpt)), "--bert-model")
    assert again["config"] == ckpt["config"] and again["vocab"] == ckpt["vocab"]
    assert again["model"].keys() == ckpt["model"].keys()
    for key, value in ckpt["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_basic_english_export_loads_in_transformers_with_our_ids(tmp_path, capsys):
    """AutoTokenizer reads a basic_english export as basic_english (not a BertTokenizer of
    5 tokens mapping every word to [UNK]), with our QA windows' pair layout, and the folder
    reads back into this project as the same tokenizer."""
    ckpt, _ = our_checkpoint(tmp_path, "qa", QuestionAnswerTask, tokenizer="basic_english")
    folder = export_to(tmp_path, ckpt)
    capsys.readouterr()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = tok.Vocab(ckpt["vocab"])
    assert len(theirs) == len(ours)
    for text in ("Who sat?", 'The cat\'s "mat"<br />sat: on; it (zebra)!', "THE CAT."):
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    pair = theirs("Who sat?", "The cat sat on the mat.")
    question, context = ours.encode("Who sat?"), ours.encode("The cat sat on the mat.")
    assert pair["input_ids"] == [tok.CLS_ID, *question, tok.SEP_ID, *context, tok.SEP_ID]
    assert pair["token_type_ids"] == [0] * (len(question) + 2) + [1] * (len(context) + 1)
    assert theirs.pad_token_id == tok.PAD_ID and theirs.mask_token_id == tok.MASK_ID
    again = checkpoint.load_checkpoint(str(folder), "--bert-model")
    assert again["vocab"] == ckpt["vocab"] and again["tokenizer"] == {"kind": "basic_english"}
    load_theirs(transformers.AutoModelForQuestionAnswering, folder)


@pytest.mark.parametrize("case, expected", [
    ("state", "a training state file (what --checkpoint resumes); give a model ("),
    ("qa_gelu", "--qa-gelu"),
    ("not_empty", "exists and is not empty (--force replaces it)"),
])
def test_export_refusals_are_one_line(tmp_path, capsys, case, expected):
    ckpt, _ = our_checkpoint(tmp_path, "qa", QuestionAnswerTask, qa_gelu=case == "qa_gelu")
    if case == "state":
        ckpt["kind"] = "state"
    if case == "not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export_to(tmp_path, ckpt)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    if case == "not_empty":
        assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp left


def test_force_replaces_a_folder_whole(tmp_path):
    ckpt, _ = our_checkpoint(tmp_path, "qa", QuestionAnswerTask)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    convert.main([str(path), str(tmp_path / "out"), "--force"])
    assert "old.txt" not in os.listdir(tmp_path / "out")
    assert "model.safetensors" in os.listdir(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_exported_qa_model_answers_through_transformers_auto_classes(tmp_path):
    # What the README shows: AutoTokenizer and AutoModelForQuestionAnswering on the folder.
    ckpt, ours = our_checkpoint(tmp_path, "qa", QuestionAnswerTask)
    folder = export_to(tmp_path, ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    theirs = load_theirs(transformers.AutoModelForQuestionAnswering, folder)
    inputs = tokenizer("where did the cat sit?", "the cat sat on the mat.", return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])[:4] == [
        "[CLS]", "where", "did", "the"]
    with torch.no_grad():
        expected = theirs(**inputs)
        start, end = ours(inputs["input_ids"], inputs["token_type_ids"])
    torch.testing.assert_close(start, expected.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(end, expected.end_logits, atol=ATOL, rtol=0)


###############################################################################
# The scripts
###############################################################################


def test_qa_task_fine_tunes_a_transformers_folder(tmp_path):
    save_their(their_model(transformers.BertModel), tmp_path / "bert")
    squad = NOTRE_DAME
    real_data_skip(squad)
    result = subprocess.run(
        [sys.executable, str(ROOT / "qa_task.py"), "--bert-model", str(tmp_path / "bert"),
         "--train-file", str(squad), "--dev-file", str(squad), "--device", "cpu",
         "--epochs", "1", "--max-steps", "3", "--batch_size", "8", "--bptt", "64",
         "--max-query-len", "16",
         "--save", str(tmp_path / "qa.pt"), "--state-file", str(tmp_path / "state.pt"),
         "--predictions", str(tmp_path / "p.json"), "--save-vocab", str(tmp_path / "v.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "End of training" in result.stdout
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "qa.pt"), "--qa-model")
    assert ckpt["kind"] == "qa" and ckpt["config"]["qa_gelu"] is False


def test_qa_task_predict_answers_as_the_transformers_pipeline(tmp_path):
    """A transformers QA folder answers through qa_task.py --predict as through
    transformers' own pipeline, for questions whose window fits in --bptt."""
    vocab, squad = BERT_VOCAB, NOTRE_DAME
    real_data_skip(vocab, squad)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(vocab.parent))
    assert len(tokenizer) == 30522  # not transformers 5's 5 tokens of vocab_file=
    theirs = their_model(transformers.BertForQuestionAnswering, vocab_size=len(tokenizer),
                         max_position_embeddings=384)
    theirs.save_pretrained(tmp_path / "qa")
    tokenizer.save_pretrained(tmp_path / "qa")
    paragraphs = json.loads(squad.read_text())["data"][0]["paragraphs"]
    items = [{"id": qa["id"], "question": qa["question"], "context": p["context"]}
             for p in paragraphs[:4] for qa in p["qas"][:3]]
    items = [i for i in items if len(tokenizer(i["question"], i["context"])["input_ids"]) <= 384]
    (tmp_path / "questions.json").write_text(json.dumps(items))
    result = subprocess.run(
        [sys.executable, str(ROOT / "qa_task.py"), "--predict", "--qa-model", str(tmp_path / "qa"),
         "--predict-file", str(tmp_path / "questions.json"), "--bptt", "384", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ours = {line["id"]: line["answer"] for line in map(json.loads, result.stdout.splitlines())}
    for item in items:
        assert ours[item["id"]] == their_answer(theirs, tokenizer, item), item


def their_answer(model, tokenizer, item, max_answer_len=30):
    """transformers' answer, decoded as its SQuAD examples do for one window: the best
    start + end logit over spans inside the context, start <= end, at most max_answer_len
    tokens, cut from the context at the tokens' character offsets."""
    enc = tokenizer(item["question"], item["context"], return_offsets_mapping=True,
                    return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0]
    with torch.no_grad():
        out = model(**enc)
    in_context = torch.tensor([i == 1 for i in enc.sequence_ids(0)])
    scores = out.start_logits[0][:, None] + out.end_logits[0][None, :]
    length = torch.arange(len(in_context))[None, :] - torch.arange(len(in_context))[:, None]
    valid = in_context[:, None] & in_context[None, :] & (length >= 0) & (length < max_answer_len)
    start, end = divmod(int(scores.masked_fill(~valid, -float("inf")).argmax()), len(in_context))
    return item["context"][int(offsets[start][0]):int(offsets[end][1])]
