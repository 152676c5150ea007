"""transformers' BERT folders, both ways: the one home of the weight names.

Out (export): config.json, model.safetensors and the tokenizer files, a folder that
transformers' Auto classes load with no missing or unexpected weights (convert.py is the
command).

In (load_folder): a transformers BERT folder (config.json, model.safetensors or
pytorch_model.bin, tokenizer.json or vocab.txt; as save_pretrained writes it or as it sits
in a transformers cache snapshot) becomes the same dict checkpoint.load_checkpoint returns
for a .pt file, so every flag that reads a checkpoint also reads such a folder.

The weights are the same tensors under other names, except our fused q/k/v projection
(split in three for transformers) and the MLM decoder (ours is a matrix of its own;
transformers' is usually tied to the word embeddings). transformers itself is not needed.
"""

import json
import os
import shutil
import tempfile

import torch

from bertkit.files import UMASK, UserError, load_torch
from bertkit.text.tokenizer import load_tokenizer, tokenizer_from_checkpoint
from model import (
    BertConfig,
    BertModel,
    MLMTask,
    NextSentenceTask,
    QuestionAnswerTask,
    SequenceClassificationTask,
)

###############################################################################
# Weight names
###############################################################################

# Our encoder's parameters -> transformers' (under `bert.` in their task models).
EMBEDDING_NAMES = {
    "bert_embed.embed.weight": "embeddings.word_embeddings.weight",
    "bert_embed.pos_embed.pos_embedding.weight": "embeddings.position_embeddings.weight",
    "bert_embed.tok_type_embed.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "bert_embed.norm.weight": "embeddings.LayerNorm.weight",
    "bert_embed.norm.bias": "embeddings.LayerNorm.bias",
}
# Inside encoder layer N (theirs: encoder.layer.N.); self_attn.in_proj is split apart.
LAYER_NAMES = {
    "self_attn.out_proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "linear1": "intermediate.dense",
    "linear2": "output.dense",
    "norm2": "output.LayerNorm",
}
QKV = ("query", "key", "value")  # the row blocks of our in_proj, in order
# The task heads (model.py keeps the old example's names).
HEAD_NAMES = {
    "mlm_span": "cls.predictions.transform.dense",
    "norm_layer": "cls.predictions.transform.LayerNorm",
    "mlm_head": "cls.predictions.decoder",
    "linear_layer": "bert.pooler.dense",  # the pooler: dense + tanh on position 0
    "ns_span": "cls.seq_relationship",
    "pooler": "bert.pooler.dense",  # SequenceClassificationTask's pooler and classifier
    "classifier": "classifier",
    "qa_span": "qa_outputs",
}
# transformers keeps a second copy of the decoder bias, cls.predictions.bias, which it ties to
# the decoder's; where a file lacks the decoder's own tensor, its tied source stands in.
TIED_SOURCES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

ID_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")

KINDS = {  # our checkpoint kind -> (our module, transformers' class)
    "encoder": (BertModel, "BertModel"),
    "mlm": (MLMTask, "BertForMaskedLM"),
    "ns": (NextSentenceTask, "BertForNextSentencePrediction"),
    "qa": (QuestionAnswerTask, "BertForQuestionAnswering"),
    "glue": (SequenceClassificationTask, "BertForSequenceClassification"),
}
# BERT's pooler (dense + tanh on position 0), which a BertModel folder, a BertForPreTraining
# and our ns_bert.pt hold beside the encoder: kept as the checkpoint's "pooler" where our
# model of that kind has no place for it.
POOLER = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")


def new_model(kind, config, n_labels=None):
    """Our module for a checkpoint of `kind` (a classifier needs its number of labels)."""
    module, _ = KINDS[kind]
    return module(config, n_labels) if kind == "glue" else module(config)


def transformers_names(key):
    """transformers' name(s) of our parameter `key`: three for the fused in_proj (its query,
    key and value row blocks), one otherwise. Our task models hold the encoder as
    `bert_model.`, transformers' as `bert.`; a bare BertModel has no prefix in either."""
    prefix, name = ("bert.", key[len("bert_model."):]) if key.startswith("bert_model.") else ("", key)
    module, _, param = name.rpartition(".")
    if name in EMBEDDING_NAMES:
        return [prefix + EMBEDDING_NAMES[name]]
    if name.startswith("layers."):
        _, index, sub = module.split(".", 2)
        theirs = f"{prefix}encoder.layer.{index}."
        if sub == "self_attn.in_proj":
            return [f"{theirs}attention.self.{part}.{param}" for part in QKV]
        return [f"{theirs}{LAYER_NAMES[sub]}.{param}"]
    if module in HEAD_NAMES:
        return [f"{HEAD_NAMES[module]}.{param}"]
    raise KeyError(f"no transformers name for parameter {key}")


def ours_to_transformers_state_dict(state_dict):
    """Our state dict (BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask or
    SequenceClassificationTask) in transformers' names (BertModel without pooler,
    BertForMaskedLM, BertForNextSentencePrediction, BertForQuestionAnswering,
    BertForSequenceClassification). The MLM decoder bias is also
    written as cls.predictions.bias, the copy transformers keeps; our decoder is not tied to
    the word embeddings, so their config needs tie_word_embeddings=False
    (transformers_config says so)."""
    out = {}
    for key, value in state_dict.items():
        names = transformers_names(key)
        out.update(zip(names, value.chunk(len(names)) if len(names) > 1 else [value], strict=True))
        if names == ["cls.predictions.decoder.bias"]:
            out["cls.predictions.bias"] = value
    return out


###############################################################################
# Config
###############################################################################

# Our BertConfig field -> transformers.BertConfig's key, and that key's default there (for
# a config.json that leaves it out).
CONFIG_KEYS = {
    "vocab_size": ("vocab_size", 30522),
    "emsize": ("hidden_size", 768),
    "nhead": ("num_attention_heads", 12),
    "nhid": ("intermediate_size", 3072),
    "nlayers": ("num_hidden_layers", 12),
    "dropout": ("hidden_dropout_prob", 0.1),
    "max_len": ("max_position_embeddings", 512),
    "type_vocab_size": ("type_vocab_size", 2),
    "pad_id": ("pad_token_id", 0),
    "layer_norm_eps": ("layer_norm_eps", 1e-12),
}


def transformers_config(config):
    """transformers.BertConfig keyword arguments for the architecture of our `config`."""
    their = {key: getattr(config, ours) for ours, (key, _) in CONFIG_KEYS.items()}
    return {**their,
            # transformers' "gelu" is the exact (erf) GELU, torch's F.gelu default, as ours.
            "hidden_act": "gelu",
            "attention_probs_dropout_prob": config.dropout,  # one dropout probability here
            "tie_word_embeddings": False}  # our MLM decoder is a matrix of its own


def their_bert_config(config, attn_implementation="sdpa"):
    """transformers.BertConfig of the architecture of our `config`; load our weights into
    their models with ours_to_transformers_state_dict."""
    import transformers  # a dev/test dependency only

    return transformers.BertConfig(**transformers_config(config),
                                   attn_implementation=attn_implementation)


def read_config(folder, where):
    """config.json of a transformers folder, refusing what our model cannot represent."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            their = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{where}: no config.json (not a transformers model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: config.json is unreadable ({e})") from None
    if not isinstance(their, dict):
        raise UserError(f"{where}: config.json is not a JSON object")

    def refuse(key, why):
        raise UserError(f"{where}: config.json has {key} {their.get(key)!r}; {why}")

    if their.get("model_type") != "bert":
        refuse("model_type", "only BERT (model_type bert) can be read")
    if their.get("hidden_act", "gelu") != "gelu":
        refuse("hidden_act", "this model's feed-forward has gelu (the exact, erf GELU) only")
    if their.get("position_embedding_type", "absolute") != "absolute":
        refuse("position_embedding_type", "this model has learned absolute positions only")
    for key in ("is_decoder", "add_cross_attention"):
        if their.get(key):
            refuse(key, "this model is a bidirectional encoder only")
    return their


def our_config(their, tokenizer, where):
    """Our BertConfig for a transformers config dict (read_config checked it)."""
    fields = {ours: their.get(key, default) for ours, (key, default) in CONFIG_KEYS.items()}
    if fields["pad_id"] is None:  # some configs leave it null; the tokenizer knows
        fields["pad_id"] = tokenizer.pad_id
    try:  # BertConfig checks itself (e.g. hidden size divisible by the heads)
        # BertForQuestionAnswering has no GELU before qa_outputs. A published model's
        # positions were all trained (BERT's last pretraining phase is at 512 tokens); our
        # exports say how many of theirs were.
        return BertConfig(**fields, qa_gelu=False,
                          trained_len=their.get("trained_len", fields["max_len"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json describes no model of ours ({e})") from None


###############################################################################
# In: a transformers folder -> our checkpoint dict
###############################################################################


def read_weights(folder, where):
    """{name: tensor} of model.safetensors (or its shards) or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    try:
        files = []
        if os.path.isfile(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
        elif os.path.isfile(index):  # a sharded save
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        if files:
            weights = {}
            for name in files:
                weights.update(load_file(os.path.join(folder, name)))
            return weights
        path = os.path.join(folder, "pytorch_model.bin")
        if not os.path.isfile(path):
            raise UserError(f"{where}: no model.safetensors or pytorch_model.bin")
        # Never unpickle arbitrary objects from a file found on disk: torch refuses any
        # but tensors and plain data, with an UnpicklingError among others.
        try:
            weights = load_torch(path)
        except Exception as e:
            raise UserError(f"{where}: its pytorch_model.bin does not load as a state dict of "
                            f"tensors (torch.load(weights_only=True): {type(e).__name__}); "
                            "nothing in it was run") from None
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{where}: its weights are unreadable ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise UserError(f"{where}: pytorch_model.bin is not a state dict of tensors")
    return weights


def canonical_names(weights):
    """The names of a transformers BERT state dict as BertFor* models have them: the encoder
    under `bert.` (a bare BertModel saves it without), LayerNorm weight/bias for the
    gamma/beta of old TensorFlow conversions (transformers renames those too)."""
    out = {}
    for name, tensor in weights.items():
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        if not name.startswith(("bert.", "cls.", "qa_outputs.", "classifier.")):
            name = "bert." + name
        out[name] = tensor
    return out


def kind_of(names):
    """Our checkpoint kind for the heads whose weights are present."""
    if "qa_outputs.weight" in names:
        return "qa"
    if "classifier.weight" in names:
        return "glue"
    if any(name.startswith("cls.predictions.") for name in names):
        return "mlm"  # BertForPreTraining too: its pooler and NSP head are dropped
    if "cls.seq_relationship.weight" in names:
        return "ns"
    return "encoder"


def decoder_source(name, theirs, tied):
    """The tensor transformers' model uses for parameter `name`. The MLM decoder's own
    weight and bias when the file has them (transformers unties tensors that differ from
    their source); else what they are tied to: the word embeddings when config.json ties
    them, cls.predictions.bias for the bias (transformers 4 tied that one always, and files
    it wrote hold only that copy)."""
    if name in theirs or name not in TIED_SOURCES:
        return name
    return TIED_SOURCES[name] if tied or name.endswith(".bias") else name


def weights_to_ours(theirs, kind, config, tied, where):
    """(our state dict of `kind`, names of their tensors left unused). `theirs` has
    canonical_names; `tied` is config.json's tie_word_embeddings."""
    n_labels = len(theirs["classifier.weight"]) if kind == "glue" else None
    with torch.device("meta"):  # names and shapes only, no memory
        expected = new_model(kind, config, n_labels).state_dict()
    prefix = "bert_model." if kind == "encoder" else ""
    state, used = {}, {"cls.predictions.bias"}  # a copy of the decoder bias, or its source
    for key, like in expected.items():
        names = [decoder_source(n, theirs, tied) for n in transformers_names(prefix + key)]
        part_shape = (like.shape[0] // len(names), *like.shape[1:])
        for name in names:
            if name not in theirs:
                raise UserError(f"{where}: no tensor {name} in its weights (needed for a "
                                f"{KINDS[kind][1]})")
            if tuple(theirs[name].shape) != part_shape:
                raise UserError(f"{where}: {name} has shape {list(theirs[name].shape)}, its "
                                f"config.json implies {list(part_shape)}")
        used.update(names)
        state[key] = torch.cat([theirs[n] for n in names]) if len(names) > 1 else theirs[names[0]]
    # The position and token-type id buffers some versions save are not weights.
    unused = [n for n in theirs if n not in used and n not in ID_BUFFERS]
    return state, sorted(unused)


def load_folder(folder, flag):
    """What checkpoint.load_checkpoint returns for a .pt file, from a transformers BERT
    folder: {"kind", "model" (our names), "config", "vocab", "tokenizer"}; "pooler" where
    the folder has BERT's pooler and our model of that kind no place for it (a BertModel, a
    BertForPreTraining); "labels" and "task" for a BertForSequenceClassification
    (classifier_labels); and "dropped", the names of their tensors left unused (the
    next-sentence head of a BertForPreTraining, say)."""
    where = f"{flag} {folder}"
    their = read_config(folder, where)
    tokenizer = load_tokenizer(folder)
    config = our_config(their, tokenizer, where)
    weights = canonical_names(read_weights(folder, where))
    kind = kind_of(weights)
    state, dropped = weights_to_ours(weights, kind, config,
                                     their.get("tie_word_embeddings", True), where)
    ckpt = {"kind": kind, "model": state, "config": config.to_dict(),
            "vocab": list(tokenizer.itos), "tokenizer": tokenizer.state()}
    if set(POOLER) <= set(dropped):
        ckpt["pooler"] = {name.rpartition(".")[2]: weights[name] for name in POOLER}
        dropped = [name for name in dropped if name not in POOLER]
    if kind == "glue":
        ckpt["labels"] = classifier_labels(their, len(state["classifier.weight"]), where)
        ckpt["task"] = their.get("finetuning_task") or None
    return {**ckpt, "dropped": dropped}


def classifier_labels(their, n_labels, where):
    """The label names, in id order, of a BertForSequenceClassification's config.json
    (its id2label; LABEL_<i> where it has none), or None for a regression model (one
    output, or problem_type regression)."""
    problem = their.get("problem_type")
    if problem == "multi_label_classification":
        raise UserError(f"{where}: config.json has problem_type {problem!r}; this project's "
                        "classifier picks one label per example")
    if problem == "regression" or n_labels == 1:
        if n_labels != 1:
            raise UserError(f"{where}: a regression model of {n_labels} outputs; this "
                            "project's regression head has one")
        return None
    id2label = their.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(n_labels)]
    if not all(isinstance(label, str) for label in labels) or len(set(labels)) < n_labels:
        raise UserError(f"{where}: config.json's id2label does not name its {n_labels} labels "
                        "once each")
    return labels


###############################################################################
# Out: our checkpoint -> a transformers folder
###############################################################################


def load_hint(kind, out_dir, pooler=False):
    """How transformers loads what export wrote."""
    if kind == "encoder" and not pooler:
        # An encoder without pooler (mlm_bert.pt): without the flag transformers adds a
        # random one.
        return f"AutoModel.from_pretrained({out_dir!r}, add_pooling_layer=False)"
    auto = {"encoder": "AutoModel", "mlm": "AutoModelForMaskedLM",
            "ns": "AutoModelForNextSentencePrediction", "qa": "AutoModelForQuestionAnswering",
            "glue": "AutoModelForSequenceClassification"}[kind]
    return f"{auto}.from_pretrained({out_dir!r})"


def head_config(kind, ckpt):
    """config.json's keys for a classifier ("glue"): its label names both ways (the strings
    of the predictions files), problem_type and the GLUE task; none for the other kinds."""
    if kind != "glue":
        return {}
    labels = ckpt.get("labels")
    names = ["LABEL_0"] if labels is None else labels  # regression: transformers' default
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
            "problem_type": "regression" if labels is None else "single_label_classification",
            "finetuning_task": ckpt.get("task")}


def write_folder(kind, state, config, tokenizer, folder, ckpt=None):
    """Write config.json, model.safetensors and the tokenizer's files into `folder`;
    returns the names written. `ckpt`: the checkpoint's other fields (an encoder's pooler,
    a classifier's labels and task)."""
    from safetensors.torch import save_file

    ckpt = ckpt or {}
    their_config = {"architectures": [KINDS[kind][1]], "model_type": "bert",
                    **transformers_config(config), **head_config(kind, ckpt),
                    # Ours, which transformers keeps and ignores: read back by our_config.
                    "trained_len": config.trained_len}
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(their_config, f, indent=2)
    # safetensors wants tensors of their own: no views (the split in_proj), no sharing.
    their_state = ours_to_transformers_state_dict(state)
    if kind == "encoder" and ckpt.get("pooler") is not None:  # a BertModel's own names
        their_state.update({f"pooler.dense.{k}": v for k, v in ckpt["pooler"].items()})
    weights = {name: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for name, tensor in their_state.items()}
    weights_file = os.path.join(folder, "model.safetensors")
    save_file(weights, weights_file, metadata={"format": "pt"})
    os.chmod(weights_file, 0o666 & ~UMASK)  # safetensors writes 0600: the umask's mode instead
    names = ["config.json", "model.safetensors"]
    # basic_english as a word-level tokenizer.json (tokenizer.basic_english_pipeline).
    return names + list(tokenizer.save_transformers(folder))


def export(ckpt, out_dir, force=False, source="the checkpoint"):
    """Write checkpoint dict `ckpt` (read from `source`) as a transformers folder `out_dir`,
    whole or not at all: built in a temporary folder beside it, then renamed. Returns the
    lines to print."""
    kind = ckpt.get("kind")
    if kind == "state":
        raise UserError(f"{source}: a training state file; give a model checkpoint instead "
                        "(full_mlm_model.pt, ns_model.pt, qa_model.pt, glue_model.pt, "
                        "mlm_bert.pt, ns_bert.pt)")
    if kind not in KINDS:
        raise UserError(f"{source}: a checkpoint of kind {kind!r}, which convert.py does not know")
    try:
        config = BertConfig.from_dict(ckpt["config"])
        tokenizer = tokenizer_from_checkpoint(ckpt)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: its config or tokenizer is unusable ({e})") from None
    if kind == "glue":
        labels, rows = ckpt.get("labels"), len(ckpt["model"].get("classifier.weight", ()))
        if rows != (1 if labels is None else len(labels)):
            raise UserError(f"{source}: a classifier of {rows} outputs whose checkpoint names "
                            f"{'no labels' if labels is None else len(labels)} labels")
    if kind == "qa" and config.qa_gelu:
        raise UserError(f"{source}: a QA model with a GELU before its span layer (--qa-gelu); "
                        "transformers' BertForQuestionAnswering has none and would answer "
                        "differently")
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        if not force:
            raise UserError(f"{out_dir} exists and is not empty (--force replaces it)")
        if not os.path.isdir(out_dir):
            raise UserError(f"{out_dir} is a file, not a folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.")
    try:
        names = write_folder(kind, ckpt["model"], config, tokenizer, tmp, ckpt)
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it private: the umask's mode instead
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old.")
            os.replace(out_dir, os.path.join(old, "replaced"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)  # over an empty folder, or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"wrote {out_dir}: a {KINDS[kind][1]} ({', '.join(names)})",
             f"load it with transformers' {load_hint(kind, out_dir, 'pooler' in ckpt)}"]
    return lines
