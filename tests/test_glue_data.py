"""bertkit/glue/tasks.py: the task table, GLUE's TSV quirks (CoLA without a header, MRPC's BOM, unmatched
quotes, QQP's malformed lines, STS-B's mixed floats, MNLI's two dev files and many columns),
every bad input's one-line error naming file and line, your own .tsv/.csv/.jsonl, the
download of a missing file from a local server, the submission file, and the real RTE."""

import csv
import hashlib
import io
import os
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REAL_RTE, make_zip, real_data_skip

from bertkit.files import DataError, UserError
from bertkit.glue import tasks as glue

QUIET = lambda *parts: None  # noqa: E731


def write(path, lines, bom=False, newline="\n"):
    """A file of `lines` (each a list of fields joined by tabs, or a string) as GLUE writes
    them: UTF-8, \\n after each line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(("\t".join(line) if isinstance(line, list) else line) + newline
                   for line in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


RTE_HEADER = ["index", "sentence1", "sentence2", "label"]
MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                     "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                     "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(index, premise, hypothesis, label, n_labels=1):
    return [str(index), "31193", f"{index}n", "government", "( ( x ) )", "( y )", "(ROOT x)",
            "(ROOT y)", premise, hypothesis, *[label] * n_labels, label]


###############################################################################
# The task table
###############################################################################


def test_every_spelling_finds_its_task_and_an_unknown_one_lists_them():
    spellings = {"CoLA": ["cola", "COLA"], "SST-2": ["sst2", "SST-2", "sst-2"],
                 "MRPC": ["mrpc"], "STS-B": ["stsb", "STS-B", "sts_b"], "QQP": ["qqp"],
                 "MNLI": ["mnli", "MNLI"], "QNLI": ["qnli"], "RTE": ["rte", "Rte"],
                 "WNLI": ["wnli"]}
    for name, given in spellings.items():
        assert all(glue.task_by_name(g).name == name for g in given)
    with pytest.raises(UserError) as error:
        glue.task_by_name("mnli-mm")
    assert "--task mnli-mm" in str(error.value) and all(n in str(error.value) for n in glue.TASKS)


def test_the_table_fixes_labels_metrics_and_files():
    t = glue.TASKS
    assert list(t) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
    assert t["MNLI"].labels == ("contradiction", "entailment", "neutral")  # transformers' order
    assert t["RTE"].labels == t["QNLI"].labels == ("entailment", "not_entailment")
    assert t["CoLA"].labels == t["MRPC"].labels == t["WNLI"].labels == ("0", "1")
    assert t["STS-B"].is_regression and t["STS-B"].metrics == ("pearson", "spearmanr")
    main = {name: task.main_metric for name, task in t.items()}
    assert main == {"CoLA": "matthews_correlation", "SST-2": "accuracy", "MRPC": "f1",
                    "STS-B": "pearson", "QQP": "f1", "MNLI": "accuracy", "QNLI": "accuracy",
                    "RTE": "accuracy", "WNLI": "accuracy"}
    assert t["MRPC"].metrics == t["QQP"].metrics == ("accuracy", "f1")
    assert t["MNLI"].dev_files == ("dev_matched.tsv", "dev_mismatched.tsv")
    assert t["MNLI"].test_files == ("test_matched.tsv", "test_mismatched.tsv")
    assert all(task.dev_files == ("dev.tsv",) for name, task in t.items() if name != "MNLI")
    assert set(glue.ARCHIVES) == set(t) - {"MRPC"}
    own = glue.own_task(("neg", "pos"))
    assert own.metrics == ("accuracy", "f1") and glue.own_task(None).main_metric == "pearson"


###############################################################################
# GLUE's TSV quirks
###############################################################################


def test_cola_train_has_no_header_and_its_test_file_has_one(tmp_path):
    task = glue.TASKS["CoLA"]
    train = write(tmp_path / "train.tsv", [["gj04", "1", "", "Our friends won't buy this."],
                                           ["gj04", "0", "*", 'He said "the more.'],
                                           ["gj04", "1", "", "One more."]])
    examples = glue.read_task_file(train, task, "train")
    assert examples.texts_a[1] == 'He said "the more.' and examples.texts_b is None
    assert examples.labels == ["1", "0", "1"] and examples.indices == ["0", "1", "2"]
    test = write(tmp_path / "test.tsv", ["index\tsentence", "0\tBill whistled.", "1\tA b."])
    examples = glue.read_task_file(test, task, "test")
    assert examples.labels is None and examples.texts_a == ["Bill whistled.", "A b."]
    # A test file given as the dev file: its header is a row of 2 fields, not 4.
    with pytest.raises(DataError, match=r"test.tsv, line 1: 2 fields where CoLA's dev file has 4"):
        glue.read_task_file(test, task, "dev")


def test_mrpc_files_begin_with_a_bom(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    dev = write(tmp_path / "dev.tsv", [header, ["1", "1355540", "1355592", 'He said "so', "So."],
                                       ["0", "2029631", "2029565", "A b .", "C d ."]], bom=True)
    examples = glue.read_task_file(dev, glue.TASKS["MRPC"], "dev")
    assert examples.labels == ["1", "0"] and examples.texts_a[0] == 'He said "so'
    assert examples.texts_b == ["So.", "C d ."] and examples.indices == ["0", "1"]


def test_unmatched_quotes_and_odd_line_breaks_stay_inside_their_sentence(tmp_path):
    """A CSV reader would run a `"` on to the next lines; Python's text mode would split a
    sentence at a \\r or U+2028. GLUE's lines end at \\n, also when a file ends in \\r\\n."""
    rows = [RTE_HEADER, ["0", '"The best', "x\u2028y", "entailment"],
            ["1", "a\rb", 'c"', "not_entailment"], ["2", "e", "f", "entailment"]]
    for newline in ("\n", "\r\n"):
        path = write(tmp_path / "dev.tsv", rows, newline=newline)
        examples = glue.read_task_file(path, glue.TASKS["RTE"], "dev")
        assert examples.texts_a == ['"The best', "a\rb", "e"]
        assert examples.texts_b == ["x\u2028y", 'c"', "f"]
        assert examples.line_numbers == [2, 3, 4]
    text = path.read_bytes().decode()
    assert len(list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))) < 4


def test_qqp_malformed_lines_are_skipped_and_counted(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    path = write(tmp_path / "train.tsv", [
        header, ["201359", "303345", "303346", "Why are African-Americans so beautiful?",
                 'Why are "hispanics so beautiful?', "0"],
        "133273\t213221\t213222\tHow does the Surface Pro",  # a question cut by a line break
        "himself?\tWhat is Shakespeare?\t1",
        ["7", "8", "9", "Q?", "R?", "1"]])
    examples = glue.read_task_file(path, glue.TASKS["QQP"], "train")
    assert examples.skipped == 2 and examples.labels == ["0", "1"]
    assert examples.indices == ["201359", "7"]  # the id column
    assert glue.describe(examples).endswith("2 pairs; 0 1, 1 1; 2 malformed lines skipped")
    # A label outside the set is still an error, in QQP too.
    bad = write(tmp_path / "dev.tsv", [header, ["1", "2", "3", "Q?", "R?", "yes"]])
    with pytest.raises(DataError, match=r"dev.tsv, line 2: label 'yes' is not one of QQP's "):
        glue.read_task_file(bad, glue.TASKS["QQP"], "dev")


STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
               "sentence1", "sentence2", "score"]


def stsb_row(index, score):
    return [str(index), "main-captions", "MSRvid", "2012test", "0001", "none", "none",
            "A plane is taking off.", "An air plane is taking off.", score]


def test_stsb_scores_in_mixed_formats_and_bad_ones(tmp_path):
    task = glue.TASKS["STS-B"]
    scores = ["5.000", "3.8", "4", "0", "2.50", "1e0"]
    path = write(tmp_path / "train.tsv", [STSB_HEADER] + [stsb_row(i, s) for i, s in
                                                          enumerate(scores)])
    examples = glue.read_task_file(path, task, "train")
    assert examples.labels == [5.0, 3.8, 4.0, 0.0, 2.5, 1.0]
    assert glue.describe(examples).endswith("6 pairs; scores 0 to 5")
    for bad, message in (("high", "score 'high' is not a number"), ("nan", "score 'nan' is not"),
                         ("", "score '' is not"), ("5.5", "score 5.5 is outside 0 to 5")):
        path = write(tmp_path / "dev.tsv", [STSB_HEADER, stsb_row(0, "1.0"), stsb_row(1, bad)])
        with pytest.raises(DataError, match=f"dev.tsv, line 3: {message}"):
            glue.read_task_file(path, task, "dev")


def test_mnli_has_two_dev_files_with_more_columns_than_train(tmp_path):
    task = glue.TASKS["MNLI"]
    train = write(tmp_path / "train.tsv", [MNLI_TRAIN_HEADER, mnli_row(0, "P.", "H.", "neutral")])
    assert glue.read_task_file(train, task, "train").labels == ["neutral"]
    for name in task.dev_files:
        path = write(tmp_path / name, [MNLI_DEV_HEADER, mnli_row(7, "P.", 'H "', "entailment", 5),
                                       mnli_row(9, "Q.", "I.", "contradiction", 5)])
        examples = glue.read_task_file(path, task, "dev")
        assert len(MNLI_DEV_HEADER) == 16 and examples.indices == ["7", "9"]
        assert examples.labels == ["entailment", "contradiction"] and examples.texts_b[0] == 'H "'
    test = write(tmp_path / "test_matched.tsv", [MNLI_TRAIN_HEADER[:10], mnli_row(3, "P.", "H.", "x")[:10]])
    examples = glue.read_task_file(test, task, "test")
    assert examples.labels is None and examples.indices == ["3"]


def test_bad_rows_are_one_error_naming_file_and_line(tmp_path):
    task = glue.TASKS["RTE"]
    cases = {
        "short.tsv": ([RTE_HEADER, ["0", "a", "b", "entailment"], ["1", "a", "entailment"]],
                      r"short.tsv, line 3: 3 fields where RTE's dev file has 4; is it a file "
                      "of another task"),
        "label.tsv": ([RTE_HEADER, ["0", "a", "b", "neutral"]],
                      r"label.tsv, line 2: label 'neutral' is not one of RTE's labels "
                      r"\(entailment, not_entailment\)"),
        # SST-2's dev file given as RTE's: its header lacks RTE's columns.
        "sst2.tsv": (["sentence\tlabel", "it 's fine .\t1"],
                     r"sst2.tsv, line 1: no column sentence1, sentence2, index in its header "
                     r"\(sentence, label\); RTE's dev file has the columns sentence1, "
                     "sentence2, label, index"),
        # WNLI's (the same header): its labels give it away.
        "wnli.tsv": ([RTE_HEADER, ["0", "a", "b", "1"]], r"wnli.tsv, line 2: label '1' is not"),
        "empty.tsv": ([], r"empty.tsv is empty"),
        "header.tsv": ([RTE_HEADER], r"header.tsv: no examples"),
    }
    for name, (lines, message) in cases.items():
        with pytest.raises(DataError, match=message):
            glue.read_task_file(write(tmp_path / name, lines), task, "dev")
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.tsv, line 2: not UTF-8 text"):
        glue.read_task_file(latin1, task, "dev")
    with pytest.raises(DataError, match="cannot read it"):
        glue.read_task_file(tmp_path / "absent.tsv", task, "dev")


###############################################################################
# Your own files
###############################################################################


def test_own_tsv_csv_and_jsonl_read_alike(tmp_path):
    tsv = write(tmp_path / "my.tsv", ["review\tstars\textra", 'Great "fun\t5\tx', "Dull.\t1\ty",
                                      "", "Fine, I guess.\t10\tz"])
    csv_path = tmp_path / "my.csv"
    csv_path.write_text('review,stars\n"Great ""fun",5\nDull.,1\n"Fine, I\nguess.",10\n')
    jsonl = write(tmp_path / "my.jsonl", ['{"review": "Great \\"fun", "stars": 5}',
                                          '{"review": "Dull.", "stars": 1}', "",
                                          '{"review": "Fine, I guess.", "stars": 10}'])
    for path in (tsv, csv_path, jsonl):
        examples = glue.read_own_file(path, ["review"], "stars")
        assert examples.texts_a[0] == 'Great "fun' and examples.texts_b is None
        assert examples.labels == ["5", "1", "10"] and examples.indices == ["0", "1", "2"]
        labels = glue.sorted_labels(examples.labels)
        assert labels == ("1", "5", "10")  # by number, not "1" < "10" < "5"
        assert glue.label_ids(examples, labels) == [1, 0, 2]
        assert glue.read_own_file(path, "review", "stars", regression=True).labels == [5.0, 1.0, 10.0]
    assert glue.read_own_file(csv_path, "review", "stars").line_numbers == [2, 3, 4]
    assert glue.read_own_file(jsonl, "review", "stars").line_numbers == [1, 2, 4]
    assert glue.sorted_labels(["pos", "neg", "pos"]) == ("neg", "pos")


def test_a_csv_field_longer_than_pythons_csv_limit_is_read(tmp_path):
    """Python's csv refuses a field over 131,072 characters by default: a 1 MB sentence
    (quoted, with a comma) reads from a .csv as from a .tsv."""
    sentence = " ".join(["word"] * 200_000) + ", and more"
    assert len(sentence) > 131072  # the csv module's default limit
    path = tmp_path / "long.csv"
    path.write_text(f'text,label\n"{sentence}",a\nshort,b\n')
    examples = glue.read_own_file(path, ["text"], "label")
    assert examples.texts_a == [sentence, "short"] and examples.labels == ["a", "b"]


def test_own_pairs_unlabeled_files_and_an_index_column(tmp_path):
    path = write(tmp_path / "pairs.tsv", ["index\tq\tp\tanswer", "a7\tWho?\tHim.\tyes",
                                          "b2\tWhat?\tIt.\tno"])
    examples = glue.read_own_file(path, ["q", "p"], "answer")
    assert examples.texts_b == ["Him.", "It."] and examples.indices == ["a7", "b2"]
    test = write(tmp_path / "test.csv", ["q,p", "Why?,So."])
    examples = glue.read_own_file(test, ["q", "p"], "answer", labeled=False)
    assert examples.labels is None and examples.texts_a == ["Why?"]
    jsonl = write(tmp_path / "b.jsonl", ['{"t": "x", "y": true, "index": 4}', '{"t": "z", "y": false}'])
    examples = glue.read_own_file(jsonl, "t", "y")
    assert examples.labels == ["true", "false"] and examples.indices == ["4", "1"]


def test_own_file_errors_name_the_file_and_what_it_has(tmp_path):
    tsv = write(tmp_path / "my.tsv", ["review\tstars", "Fine.\t5"])
    with pytest.raises(DataError, match=r"my.tsv has no column 'revew' \(its columns: review, stars\)"):
        glue.read_own_file(tsv, ["revew"], "stars")
    jsonl = write(tmp_path / "my.jsonl", ['{"review": "a", "stars": 1}', '{"text": "b", "stars": 2}'])
    with pytest.raises(DataError, match=r"my.jsonl, line 2: no key 'review' \(its keys: text, stars\)"):
        glue.read_own_file(jsonl, ["review"], "stars")
    for name in ("empty.tsv", "empty.csv", "empty.jsonl"):
        path = write(tmp_path / name, [])
        with pytest.raises(DataError, match=f"{name}"):
            glue.read_own_file(path, ["review"], "stars")
    with pytest.raises(DataError, match=r"head.csv: no examples"):
        glue.read_own_file(write(tmp_path / "head.csv", ["review,stars"]), ["review"], "stars")
    cases = {
        "short.tsv": (["a\tb", "x\ty", "z"], "short.tsv, line 3: 1 fields where the header has 2"),
        "score.csv": (["a,b", "x,1.5", "y,lots"], "score.csv, line 3: score 'lots' is not a number"),
        "nolabel.csv": (["a,b", "x,"], "nolabel.csv, line 2: no label in column 'b'"),
        "bad.jsonl": (['{"a": "x", "b": 1}', "{oops"], "bad.jsonl, line 2: not JSON"),
        "list.jsonl": (['{"a": ["x"], "b": 1}'], r"list.jsonl, line 1: 'a' is \[\"x\"\]"),
    }
    for name, (lines, message) in cases.items():
        with pytest.raises(DataError, match=message):
            glue.read_own_file(write(tmp_path / name, lines), "a", "b",
                               regression=name == "score.csv")
    with pytest.raises(UserError, match=r"my.txt: use a .tsv, .csv or .jsonl file"):
        glue.read_own_file(write(tmp_path / "my.txt", ["a"]), "a", "b")
    with pytest.raises(UserError, match="give one column or two"):
        glue.read_own_file(tsv, ["a", "b", "c"], "stars")


def test_a_dev_label_unseen_in_training_names_its_line(tmp_path):
    train = glue.read_own_file(write(tmp_path / "t.csv", ["x,y", "a,pos", "b,neg"]), "x", "y")
    dev = glue.read_own_file(write(tmp_path / "d.csv", ["x,y", "c,neg", "d,neutral"]), "x", "y")
    labels = glue.sorted_labels(train.labels)
    with pytest.raises(DataError, match=r"d.csv, line 3: label 'neutral' is not one of the "
                                        r"training labels \(neg, pos\)"):
        glue.label_ids(dev, labels)


###############################################################################
# Downloads
###############################################################################


RTE_MEMBERS = {f"RTE/{name}.tsv": "\t".join(RTE_HEADER) + f"\n0\tA {name}.\tB.\tentailment\n"
               for name in ("train", "dev")}
RTE_MEMBERS["RTE/test.tsv"] = "index\tsentence1\tsentence2\n0\tA.\tB.\n"


def serve(monkeypatch, served, base, payload, sha256=None, name="RTE"):
    """Put `payload` in the served folder and point the task's archive at it."""
    archive = glue.ARCHIVES[name]
    (served / archive.filename).write_bytes(payload)
    monkeypatch.setitem(glue.ARCHIVES, name, replace(
        archive, urls=(f"{base}/{archive.filename}",),
        sha256=sha256 or hashlib.sha256(payload).hexdigest()))


def test_a_missing_file_is_downloaded_checked_and_put_in_place(tmp_path, http_root, monkeypatch):
    base, served = http_root
    serve(monkeypatch, served, base, make_zip(RTE_MEMBERS))
    data_dir = tmp_path / "data"
    mine = write(data_dir / "glue" / "RTE" / "train.tsv", [RTE_HEADER, ["0", "Mine.", "B.", "entailment"]])
    logged = []
    path = glue.task_file(glue.TASKS["RTE"], "dev.tsv", data_dir, logged.append)
    assert path == data_dir / "glue" / "RTE" / "dev.tsv" and "RTE.zip" in " ".join(logged)
    assert glue.read_task_file(path, glue.TASKS["RTE"], "dev").texts_a == ["A dev."]
    assert mine.read_text().count("Mine.") == 1  # a file already there is kept
    assert sorted(os.listdir(data_dir / "glue")) == ["RTE"]  # no zip, no staging folder
    assert sorted(os.listdir(data_dir / "glue" / "RTE")) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert glue.task_file(glue.TASKS["RTE"], "dev.tsv", data_dir, QUIET) == path  # no download


def test_a_bad_checksum_or_archive_leaves_nothing(tmp_path, http_root, monkeypatch):
    base, served = http_root
    data_dir = tmp_path / "data"
    serve(monkeypatch, served, base, make_zip(RTE_MEMBERS), sha256="0" * 64)
    with pytest.raises(DataError) as error:
        glue.task_file(glue.TASKS["RTE"], "dev.tsv", data_dir, QUIET)
    assert "SHA-256 mismatch" in str(error.value) and not data_dir.exists()
    # An archive that matches its checksum but lacks the file (another task's zip).
    serve(monkeypatch, served, base, make_zip({"WNLI/dev.tsv": "x\n"}))
    with pytest.raises(DataError, match=r"RTE.zip holds no RTE/dev.tsv"):
        glue.task_file(glue.TASKS["RTE"], "dev.tsv", data_dir, QUIET)
    assert not data_dir.exists()


def test_offline_the_error_names_the_file_to_place(tmp_path, closed_url, monkeypatch):
    archive = glue.ARCHIVES["MNLI"]
    monkeypatch.setitem(glue.ARCHIVES, "MNLI", replace(archive, urls=(f"{closed_url}/MNLI.zip",)))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        glue.task_file(glue.TASKS["MNLI"], "dev_mismatched.tsv", data_dir, QUIET)
    message = str(error.value)
    assert str(data_dir / "glue" / "MNLI" / "dev_mismatched.tsv") in message
    assert f"place MNLI.zip (SHA-256 {archive.sha256}) in {data_dir / 'glue'}/" in message
    # every file a run needs that is missing: its train and dev files too
    for name in ("train.tsv", "dev_matched.tsv"):
        assert str(data_dir / "glue" / "MNLI" / name) in message, message
    rte = glue.ARCHIVES["RTE"]
    monkeypatch.setitem(glue.ARCHIVES, "RTE", replace(rte, urls=(f"{closed_url}/RTE.zip",)))
    with pytest.raises(DataError) as error:
        glue.task_file(glue.TASKS["RTE"], "train.tsv", data_dir, QUIET)
    assert (f"or its files ({data_dir / 'glue' / 'RTE' / 'train.tsv'}, "
            f"{data_dir / 'glue' / 'RTE' / 'dev.tsv'})") in str(error.value)
    assert "\n" not in message and not data_dir.exists()
    with pytest.raises(UserError, match="RTE has no file dev_matched.tsv"):
        glue.task_file(glue.TASKS["RTE"], "dev_matched.tsv", data_dir, QUIET)


def test_an_archive_placed_by_hand_is_used_offline(tmp_path, closed_url, monkeypatch):
    payload = make_zip(RTE_MEMBERS)
    monkeypatch.setitem(glue.ARCHIVES, "RTE", replace(
        glue.ARCHIVES["RTE"], urls=(f"{closed_url}/RTE.zip",),
        sha256=hashlib.sha256(payload).hexdigest()))
    (tmp_path / "data" / "glue").mkdir(parents=True)
    (tmp_path / "data" / "glue" / "RTE.zip").write_bytes(payload)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    path = glue.task_file(glue.TASKS["RTE"], "train.tsv", tmp_path / "data", QUIET)
    assert path.read_text() == RTE_MEMBERS["RTE/train.tsv"]


MSR_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def test_mrpc_is_built_as_glues_download_script_builds_it(tmp_path, http_root, monkeypatch):
    base, served = http_root
    sources = {
        "train": MSR_HEADER + '1\t11\t12\tHe said "so\tSo .\n0\t21\t22\tA .\tB .\n1\t31\t32\tC .\tD .\n',
        "test": MSR_HEADER + "1\t41\t42\tE .\tF .\n0\t51\t52\tG .\tH .\n",
        "dev_ids": "21\t22\n",
    }
    for key, text in sources.items():
        archive = glue.MRPC_SOURCES[key]
        payload = text.encode("utf-8")
        (served / archive.filename).write_bytes(payload)
        monkeypatch.setitem(glue.MRPC_SOURCES, key, replace(
            archive, urls=(f"{base}/{archive.filename}",), sha256=hashlib.sha256(payload).hexdigest()))
    task = glue.TASKS["MRPC"]
    dev = glue.task_file(task, "dev.tsv", tmp_path, QUIET)
    folder = dev.parent
    assert folder == tmp_path / "glue" / "MRPC"
    assert dev.read_bytes().startswith(b"\xef\xbb\xbfQuality\t")  # the BOM, as GLUE's files have it
    assert dev.read_text(encoding="utf-8-sig").splitlines()[1:] == ["0\t21\t22\tA .\tB ."]
    train = glue.read_task_file(folder / "train.tsv", task, "train")
    assert train.texts_a == ['He said "so', "C ."] and train.labels == ["1", "1"]
    test = glue.task_file(task, "test.tsv", tmp_path, QUIET)
    assert test.read_text().splitlines() == ["index\t#1 ID\t#2 ID\t#1 String\t#2 String",
                                             "0\t41\t42\tE .\tF .", "1\t51\t52\tG .\tH ."]
    assert glue.read_task_file(test, task, "test").indices == ["0", "1"]


###############################################################################
# Submission files
###############################################################################


def test_predictions_are_written_in_glues_submission_layout(tmp_path):
    path = tmp_path / "RTE.tsv"
    glue.write_predictions(path, ["0", "1", "2"], [1, 0, 1], ("entailment", "not_entailment"))
    assert path.read_text() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n2\tnot_entailment\n"
    import torch

    glue.write_predictions(path, ["5", "6"], torch.tensor([4.23456, -0.0004]), None)
    assert path.read_text() == "index\tprediction\n5\t4.235\n6\t-0.000\n"
    before = path.read_bytes()
    with pytest.raises(IndexError):
        glue.write_predictions(path, ["0"], [7], ("0", "1"))
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        glue.write_predictions(path, ["0"], [0, 1], ("0", "1"))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["RTE.tsv"]


###############################################################################
# The real RTE
###############################################################################


def test_real_rte_reads_as_glue_publishes_it():
    real_data_skip(REAL_RTE / "train.tsv", REAL_RTE / "dev.tsv")
    task = glue.task_by_name("rte")
    train = glue.read_task_file(REAL_RTE / "train.tsv", task, "train")
    dev = glue.read_task_file(REAL_RTE / "dev.tsv", task, "dev")
    assert (len(train), len(dev), dev.labels.count("entailment")) == (2490, 277, 146)
    assert glue.task_file(task, "dev.tsv", REAL_RTE.parents[1], QUIET) == REAL_RTE / "dev.tsv"
    # The same rows as a csv reader with quoting off (how transformers' and datasets' GLUE
    # readers take them).
    with open(REAL_RTE / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert [r[1] for r in rows] == dev.texts_a and [r[2] for r in rows] == dev.texts_b
    assert [r[0] for r in rows] == dev.indices and [r[3] for r in rows] == dev.labels
