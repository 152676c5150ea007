"""Our modules compute what transformers' BERT computes, given the same weights.

transformers is a test/dev dependency only, so the whole module is skipped without it.
Tiny fp32 configs, dropout 0 unless a test is about dropout; weights and config go through
transformers_format.ours_to_transformers_state_dict and transformers_format.their_bert_config.
"""

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bertkit.transformers_format import ours_to_transformers_state_dict, their_bert_config  # noqa: E402
from model import (  # noqa: E402
    BertConfig,
    BertModel,
    MLMTask,
    NextSentenceTask,
    QuestionAnswerTask,
    SequenceClassificationTask,
    padding_mask,
)

ATOL = 1e-5


def tiny_config(**overrides):
    fields = dict(
        vocab_size=100, emsize=32, nhead=2, nhid=64, nlayers=2, dropout=0.0, max_len=64, pad_id=1
    )
    return BertConfig(**{**fields, **overrides})


def make_pair(ours_cls, theirs_cls, attn_implementation="sdpa", num_labels=None, **overrides):
    """Our module and transformers' counterpart with identical weights, both in eval mode
    (`num_labels`: of a sequence classifier)."""
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    ours = ours_cls(config) if num_labels is None else ours_cls(config, num_labels)
    # Non-default values everywhere (LayerNorm weights are 1, biases 0 at init) so that a
    # swapped or missing parameter cannot hide behind its initial value.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    kwargs = {"add_pooling_layer": False} if theirs_cls is transformers.BertModel else {}
    their_config = their_bert_config(config, attn_implementation)
    if num_labels is not None:
        their_config.num_labels = num_labels
    theirs = theirs_cls(their_config, **kwargs)
    theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()), strict=True)
    return config, ours.eval(), theirs.eval()


def make_batch(config, batch=3, seq=16, padded=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=g)  # no pad id inside
    token_types = torch.zeros_like(ids)
    token_types[:, seq // 2 :] = 1
    if padded:
        # Rows of different lengths; row 0 stays unpadded.
        for row, length in enumerate([seq, seq - 5, seq // 2][:batch]):
            ids[row, length:] = config.pad_id
            token_types[row, length:] = 0
    return ids, token_types


def test_mapping_covers_every_parameter():
    config = tiny_config()
    for ours_cls, theirs_cls in [
        (MLMTask, transformers.BertForMaskedLM),
        (QuestionAnswerTask, transformers.BertForQuestionAnswering),
        (NextSentenceTask, transformers.BertForNextSentencePrediction),
        (functools.partial(SequenceClassificationTask, n_labels=2),
         transformers.BertForSequenceClassification),
    ]:
        mapped = ours_to_transformers_state_dict(ours_cls(config).state_dict())
        expected = theirs_cls(their_bert_config(config)).state_dict()
        assert set(mapped) == set(expected), ours_cls
        for key, value in mapped.items():
            assert value.shape == expected[key].shape, key


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_matches_transformers(attn_implementation, padded):
    config, ours, theirs = make_pair(BertModel, transformers.BertModel, attn_implementation)
    ids, token_types = make_batch(config, padded=padded)
    real = ids.ne(config.pad_id)
    with torch.no_grad():
        expected = theirs(
            input_ids=ids, token_type_ids=token_types, attention_mask=real.long()
        ).last_hidden_state
        got = ours(ids, token_types, padding_mask(ids, config.pad_id))
    # Padded query positions are garbage in both (nobody reads them): compare real ones.
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_encoder_without_token_types_matches_transformers():
    config, ours, theirs = make_pair(BertModel, transformers.BertModel)
    ids, _ = make_batch(config)
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_mlm_logits_match_transformers_at_masked_positions(padded):
    config, ours, theirs = make_pair(MLMTask, transformers.BertForMaskedLM)
    ids, token_types = make_batch(config, padded=padded)
    real = ids.ne(config.pad_id)
    # 4 real positions per row (the shortest row has 8), as data.mask_tokens gives them.
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)).masked_fill(~real, -1)
    masked_positions = scores.topk(4, dim=1).indices.sort(dim=1).values
    masked = torch.zeros_like(real).scatter_(1, masked_positions, True)
    with torch.no_grad():
        expected = theirs(
            input_ids=ids, token_type_ids=token_types, attention_mask=real.long()
        ).logits
        got = ours(ids, masked_positions, token_types, real)
        got_full = ours(ids, None, token_types, real)
    assert got.shape == (ids.size(0) * 4, config.vocab_size)
    torch.testing.assert_close(got, expected[masked], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_full[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_qa_logits_match_transformers_without_gelu(padded):
    config, ours, theirs = make_pair(
        QuestionAnswerTask, transformers.BertForQuestionAnswering, qa_gelu=False
    )
    ids, token_types = make_batch(config, padded=padded)
    real = ids.ne(config.pad_id)
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=token_types, attention_mask=real.long())
        start_logits, end_logits = ours(ids, token_types, real)
    torch.testing.assert_close(start_logits[real], expected.start_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(end_logits[real], expected.end_logits[real], atol=ATOL, rtol=0)


def test_qa_gelu_differs_from_transformers():
    # The old example put a GELU between the encoder and the QA projection; transformers
    # does not. qa_gelu=True keeps the old behaviour, so its logits must not match.
    config, ours, theirs = make_pair(
        QuestionAnswerTask, transformers.BertForQuestionAnswering, qa_gelu=True
    )
    ids, token_types = make_batch(config)
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=token_types)
        start_logits, end_logits = ours(ids, token_types)
    assert (start_logits - expected.start_logits).abs().max() > 1e-2
    assert (end_logits - expected.end_logits).abs().max() > 1e-2


def padded_pair_logits(config, ours, theirs):
    """(ours, theirs): the logits of both sequence-pair classifiers on a padded batch."""
    ids, token_types = make_batch(config, padded=True)
    with torch.no_grad():
        expected = theirs(
            input_ids=ids, token_type_ids=token_types, attention_mask=ids.ne(config.pad_id).long()
        ).logits
        return ours(ids, token_types, padding_mask(ids, config.pad_id)), expected


def test_next_sentence_logits_match_transformers():
    config, ours, theirs = make_pair(NextSentenceTask, transformers.BertForNextSentencePrediction)
    got, expected = padded_pair_logits(config, ours, theirs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_labels", [3, 1])  # 1: regression
def test_sequence_classification_logits_match_transformers(num_labels):
    config, ours, theirs = make_pair(SequenceClassificationTask,
                                     transformers.BertForSequenceClassification,
                                     num_labels=num_labels)
    got, expected = padded_pair_logits(config, ours, theirs)
    assert got.shape == (len(expected), num_labels)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_mlm_gradients_match_transformers():
    # The training step is what bench.py times: the backward pass must agree too.
    config, ours, theirs = make_pair(MLMTask, transformers.BertForMaskedLM)
    ids, token_types = make_batch(config)
    scores = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    masked_positions = scores.topk(5, dim=1).indices.sort(dim=1).values
    masked = torch.zeros(ids.shape, dtype=torch.bool).scatter_(1, masked_positions, True)
    labels = torch.full_like(ids, -100)
    labels[masked] = ids[masked]
    loss = torch.nn.functional.cross_entropy(
        ours(ids, masked_positions, token_types), ids[masked]
    )
    loss.backward()
    their_loss = theirs(input_ids=ids, token_type_ids=token_types, labels=labels).loss
    their_loss.backward()
    torch.testing.assert_close(loss, their_loss, atol=ATOL, rtol=0)
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    mapped = ours_to_transformers_state_dict(ours_grads)
    their_grads = dict(theirs.named_parameters())
    for key, grad in mapped.items():
        if key == "cls.predictions.bias":
            continue  # unused when untied: transformers' decoder applies decoder.bias
        torch.testing.assert_close(grad, their_grads[key].grad, atol=ATOL, rtol=0, msg=key)


def test_training_with_dropout_never_attends_to_padding():
    # In training mode with dropout the CPU attention path applies the padding mask itself:
    # what stands at padded positions must not change the output at real ones.
    config = tiny_config(dropout=0.5)
    torch.manual_seed(0)
    ours = BertModel(config).train()
    ids, token_types = make_batch(config, padded=True)
    real = ids.ne(config.pad_id)
    other_ids = torch.where(real, ids, 7)  # different tokens where the mask says padding
    torch.manual_seed(5)  # the same dropout masks for both
    got = ours(ids, token_types, real)
    torch.manual_seed(5)
    other = ours(other_ids, token_types, real)
    torch.testing.assert_close(got[real], other[real], atol=ATOL, rtol=0)
    assert not torch.allclose(got[~real], other[~real])  # the padded positions did change
