"""model.py: shapes, padding never attended, masked-only MLM head, BERT init, config."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import (
    BertConfig,
    BertModel,
    MLMTask,
    NextSentenceTask,
    QuestionAnswerTask,
    SequenceClassificationTask,
    init_bert_weights,
    padding_mask,
)

PAD = 1


def tiny_config(**overrides):
    fields = dict(vocab_size=50, emsize=32, nhead=4, nhid=64, nlayers=2, dropout=0.0,
                  max_len=64, pad_id=PAD)
    return BertConfig(**{**fields, **overrides})


def make_model(cls, seed=0, n_labels=None, **overrides):
    torch.manual_seed(seed)
    head = {} if n_labels is None else {"n_labels": n_labels}
    model = cls(tiny_config(**overrides), **head)
    # Off the initial values, so that a LayerNorm or bias that is skipped shows up.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(batch_size=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (batch_size, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    return ids, types


def pad(ids, types, extra):
    """Append `extra` padding positions (pad id, token type 0) to every row."""
    return (torch.cat([ids, torch.full((len(ids), extra), PAD)], 1),
            torch.cat([types, torch.zeros(len(ids), extra, dtype=types.dtype)], 1))


def test_shapes():
    ids, types = batch(batch_size=3, seq=12)
    assert make_model(BertModel)(ids, types).shape == (3, 12, 32)
    mlm = make_model(MLMTask)
    assert mlm(ids).shape == (3, 12, 50)
    masked_positions = torch.tensor([[1, 4], [2, 3], [5, 7]])
    assert mlm(ids, masked_positions).shape == (6, 50)
    assert make_model(NextSentenceTask)(ids, types).shape == (3, 2)
    assert make_model(SequenceClassificationTask, n_labels=3)(ids, types).shape == (3, 3)
    assert make_model(SequenceClassificationTask, n_labels=1)(ids, types).shape == (3, 1)
    start, end = make_model(QuestionAnswerTask)(ids, types)
    assert start.shape == end.shape == (3, 12)


def test_padding_mask():
    ids, _ = batch()
    ids[1, 8:] = PAD
    mask = padding_mask(ids, PAD)
    assert mask.shape == (3, 12) and mask.sum() == 3 * 12 - 4 and not mask[1, 8:].any()


@pytest.mark.parametrize("extra", [1, 7])
def test_padding_is_never_attended(extra):
    ids, types = batch()
    ids[2, 9:] = PAD  # a row already padded
    real = ids.ne(PAD)
    padded_ids, padded_types = pad(ids, types, extra)
    mask, padded_mask = padding_mask(ids, PAD), padding_mask(padded_ids, PAD)
    with torch.no_grad():
        encoder = make_model(BertModel)
        torch.testing.assert_close(encoder(padded_ids, padded_types, padded_mask)[:, :12][real],
                                   encoder(ids, types, mask)[real], atol=1e-5, rtol=0)
        ns = make_model(NextSentenceTask)
        torch.testing.assert_close(ns(padded_ids, padded_types, padded_mask),
                                   ns(ids, types, mask), atol=1e-5, rtol=0)
        classifier = make_model(SequenceClassificationTask, n_labels=3)
        torch.testing.assert_close(classifier(padded_ids, padded_types, padded_mask),
                                   classifier(ids, types, mask), atol=1e-5, rtol=0)
        qa = make_model(QuestionAnswerTask)
        for got, expected in zip(qa(padded_ids, padded_types, padded_mask), qa(ids, types, mask)):
            torch.testing.assert_close(got[:, :12][real], expected[real], atol=1e-5, rtol=0)


def test_padding_changes_outputs_when_attended():
    # The check above has teeth: the same padding, attended, moves the outputs.
    ids, types = batch()
    padded_ids, padded_types = pad(ids, types, 5)
    encoder = make_model(BertModel)
    with torch.no_grad():
        attended = encoder(padded_ids, padded_types, padding_mask=None)[:, :12]
        assert not torch.allclose(attended, encoder(ids, types), atol=1e-3)


def test_masked_only_head_loss_equals_full_head_loss():
    model = make_model(MLMTask)
    ids, _ = batch(batch_size=4, seq=16)
    g = torch.Generator().manual_seed(3)
    masked_positions = torch.rand(4, 15, generator=g).topk(5, dim=1).indices.sort(1).values + 1
    masked = torch.zeros(ids.shape, dtype=torch.bool).scatter_(1, masked_positions, True)
    targets = torch.randint(5, 50, (4 * 5,), generator=g)
    with torch.no_grad():
        selected = model(ids, masked_positions)
        full = model(ids)
    # Row-major order: the same rows as boolean indexing of the full output.
    torch.testing.assert_close(selected, full[masked], atol=1e-5, rtol=0)
    torch.testing.assert_close(F.cross_entropy(selected, targets),
                               F.cross_entropy(full[masked], targets), atol=1e-6, rtol=0)


def test_masked_only_head_gradients_equal_full_head_gradients():
    ids, _ = batch(batch_size=2, seq=10)
    masked_positions = torch.tensor([[2, 5], [3, 7]])
    masked = torch.zeros(2, 10, dtype=torch.bool).scatter_(1, masked_positions, True)
    targets = torch.tensor([7, 8, 9, 10])
    grads = []
    for select in (True, False):
        model = make_model(MLMTask)
        logits = model(ids, masked_positions) if select else model(ids)[masked]
        F.cross_entropy(logits, targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask,
                                 partial(SequenceClassificationTask, n_labels=3)])
def test_bert_init(cls):
    torch.manual_seed(0)
    model = cls(BertConfig(vocab_size=2000, emsize=128, nhead=4, nhid=256, nlayers=2))
    n_linear = n_norm = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if weight.numel() >= 256:  # enough values for a meaningful std
                assert weight.std().item() == pytest.approx(0.02, rel=0.15), name
                assert abs(weight.mean().item()) < 0.005, name
            n_linear += 1
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert (module.bias == 0).all(), name
        if isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all(), name
            n_norm += 1
    assert n_linear >= 2 * 4 + 3 and n_norm >= 2 * 2 + 1  # every layer was looked at


def test_init_bert_weights_resets_every_kind():
    layer, norm = nn.Linear(64, 64), nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.fill_(3)
    for module in (layer, norm):
        init_bert_weights(module)
    assert (layer.bias == 0).all() and (norm.weight == 1).all()


def test_the_padding_row_starts_at_zero_and_gets_no_gradient():
    # transformers' BertEmbeddings: padding_idx on the word embedding, its row 0 at init.
    torch.manual_seed(0)
    model = QuestionAnswerTask(tiny_config())
    embed = model.bert_model.bert_embed.embed
    assert embed.padding_idx == PAD and (embed.weight[PAD] == 0).all()
    assert (embed.weight[PAD + 1] != 0).any()
    ids, types = pad(*batch(), 4)
    start, end = model(ids, types, padding_mask(ids, PAD))
    # Padding's own logits in the loss (as --span-loss bert has them): the [PAD] row
    # influences the loss, still it is not trained.
    (start.logsumexp(1) + end.logsumexp(1)).sum().backward()
    assert (embed.weight.grad[PAD] == 0).all()
    assert (embed.weight.grad[ids[0, 0]] != 0).any()


def test_config_round_trip():
    config = tiny_config(nlayers=3, qa_gelu=False, layer_norm_eps=1e-6)
    again = BertConfig.from_dict(config.to_dict())
    assert again == config
    # The config alone rebuilds a model the weights load into.
    state = MLMTask(config).state_dict()
    MLMTask(again).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="unknown config keys"):
        BertConfig.from_dict({**config.to_dict(), "hidden_size": 32})


def test_sequences_longer_than_max_len_are_refused():
    model = make_model(BertModel, max_len=8)
    with pytest.raises(ValueError, match="longer than"):
        model(torch.full((1, 9), 7))


def test_emsize_not_divisible_by_nhead_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        BertModel(tiny_config(emsize=30, nhead=4))


def test_task_heads_keep_the_encoders_initial_weights():
    """A head initializes only its own layers: building MLMTask draws the same encoder
    as building the BertModel alone."""
    torch.manual_seed(0)
    encoder = BertModel(tiny_config())
    for cls in (MLMTask, NextSentenceTask, QuestionAnswerTask,
                partial(SequenceClassificationTask, n_labels=2)):
        torch.manual_seed(0)
        task = cls(tiny_config())
        for (name, a), b in zip(encoder.state_dict().items(), task.bert_model.state_dict().values()):
            assert torch.equal(a, b), (cls, name)


def test_checkpoints_of_the_old_layout_load_and_answer_the_same():
    """Checkpoints written before model.py was restructured (tests/fixtures) load into
    today's modules with the same keys and give the outputs they gave then."""
    from bertkit import checkpoint

    fixture = torch.load(Path(__file__).parent / "fixtures" / "checkpoints_eda0781.pt",
                         weights_only=True)
    inputs = fixture["inputs"]
    ids, types = inputs["ids"], inputs["token_types"]
    mask = padding_mask(ids, PAD)
    masked_positions = inputs["masked_positions"].nonzero()[:, 1].view(len(ids), -1)
    for kind, cls in (("mlm", MLMTask), ("ns", NextSentenceTask), ("qa", QuestionAnswerTask),
                      ("encoder", BertModel)):
        ckpt = fixture[kind]["checkpoint"]
        config, _ = checkpoint.config_and_vocab(ckpt, "--bert-model", kind)
        model = cls(config)
        model.load_state_dict(ckpt["model"], strict=True)
        model.eval()
        with torch.no_grad():
            if kind == "mlm":
                got = model(ids, masked_positions, types, mask)
            elif kind == "qa":
                got = torch.stack(model(ids, types, mask))
            else:
                got = model(ids, types, mask)
        torch.testing.assert_close(got, fixture[kind]["expected"], atol=1e-5, rtol=1e-5)


def test_next_sentence_is_the_classification_head_with_two_labels_and_no_dropout():
    """NextSentenceTask computes what SequenceClassificationTask with 2 labels computes
    (the same weights under the old example's names), with no dropout on the pooled
    output; the classification head drops out with the encoder's probability."""
    ns = make_model(NextSentenceTask, dropout=0.3)
    classifier = SequenceClassificationTask(tiny_config(dropout=0.3), n_labels=2)
    renamed = {k.replace("linear_layer.", "pooler.").replace("ns_span.", "classifier."): v
               for k, v in ns.state_dict().items()}
    classifier.load_state_dict(renamed, strict=True)
    assert ns.pooler is ns.linear_layer and ns.classifier is ns.ns_span
    assert ns.dropout.p == 0.0 and classifier.dropout.p == 0.3
    ids, types = batch()
    with torch.no_grad():
        torch.testing.assert_close(ns(ids, types), classifier.eval()(ids, types), rtol=0, atol=0)
        # In training, the classifier's dropout on the pooled output moves its logits.
        classifier.train()
        classifier.bert_model.eval()  # the encoder's own dropout off: only the head's
        torch.manual_seed(0)
        assert not torch.allclose(classifier(ids, types), ns(ids, types))


def test_classification_head_is_berts_pooler_dropout_linear():
    model = make_model(SequenceClassificationTask, n_labels=3)
    ids, types = batch()
    with torch.no_grad():
        hidden = model.bert_model(ids, types)
        expected = model.classifier(torch.tanh(model.pooler(hidden[:, 0])))
        torch.testing.assert_close(model(ids, types), expected, rtol=0, atol=1e-6)
    assert [name for name, _ in model.named_children()] == [
        "bert_model", "pooler", "dropout", "classifier"]


@pytest.mark.parametrize("padded", [False, True])
def test_cls_only_is_the_full_encoders_cls_output_with_the_same_gradients(padded):
    """BertModel(..., cls_only=True) (the classifier's path: the last layer at <cls> alone,
    and on the CPU the padding packed away) gives position 0 of the full output, and the
    same gradients to every weight."""
    ids, types = batch(batch_size=4, seq=12)
    if padded:
        ids[1, 7:], ids[3, 3:] = PAD, PAD
        types[1, 7:], types[3, 3:] = 0, 0
    mask = padding_mask(ids, PAD)
    grads, outputs = [], []
    for cls_only in (True, False):
        encoder = make_model(BertModel).train()  # dropout 0: the same function
        out = encoder(ids, types, mask, cls_only=cls_only)
        out = out if cls_only else out[:, 0]
        (out * torch.arange(32.0)).sum().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in encoder.named_parameters()})
    assert outputs[0].shape == (4, 32)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_classifier_in_training_never_reads_padding():
    """With dropout, the packed path: other tokens at the padding change no logit."""
    torch.manual_seed(0)
    model = SequenceClassificationTask(tiny_config(dropout=0.3), 3).train()
    ids, types = batch(batch_size=3, seq=12)
    ids[0, 5:], ids[2, 9:] = PAD, PAD
    mask = padding_mask(ids, PAD)
    torch.manual_seed(5)
    got = model(ids, types, mask)
    torch.manual_seed(5)
    other = model(torch.where(mask, ids, 7), types, mask)
    torch.testing.assert_close(got, other, atol=0, rtol=0)


def test_cls_only_without_packing_is_the_same(monkeypatch):
    """The padded layout cls_only takes on a GPU (no packing) gives the packed one's."""
    import model as model_module

    ids, types = batch(batch_size=3, seq=10)
    ids[0, 6:] = PAD
    mask = padding_mask(ids, PAD)
    encoder = make_model(BertModel)
    with torch.no_grad():
        packed = encoder(ids, types, mask, cls_only=True)
        monkeypatch.setattr(model_module, "packing", lambda *args: None)
        padded = encoder(ids, types, mask, cls_only=True)
        full = encoder(ids, types, mask)[:, 0]
    torch.testing.assert_close(padded, packed, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, full, atol=1e-5, rtol=0)
