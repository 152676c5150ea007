import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NORMANS, NOTRE_DAME, needs_real

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metrics import (  # noqa: E402
    SquadFormatError,
    compute_qa_exact,
    compute_qa_f1,
    evaluate,
    evaluate_v2,
    exact_match_score,
    f1_score,
    f1_score_v2,
    has_unanswerable,
    iter_questions,
    load_na_probs,
    load_predictions,
    load_squad_json,
    metric_max_over_ground_truths,
    normalize_answer,
)


def make_dataset(qas_answers, v2=False):
    """SQuAD ``data`` list with one paragraph holding {id: [answer texts]}; with ``v2``,
    each question also has ``is_impossible`` (true where its list is empty)."""
    qas = [
        {
            "id": qid,
            "question": f"q {qid}?",
            "answers": [{"text": t, "answer_start": 0} for t in texts],
        }
        for qid, texts in qas_answers.items()
    ]
    if v2:
        for qa in qas:
            qa["is_impossible"] = not qa["answers"]
    return [{"title": "T", "paragraphs": [{"context": "ctx", "qas": qas}]}]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run_script(*args):
    """`python metrics.py ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "metrics.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_cli(*args):
    """metrics.py's command line, main(argv), in this process (a subprocess costs seconds
    of imports each; test_cli_prints_one_json_line runs the script itself): its exit code,
    stdout and stderr as a CompletedProcess."""
    import contextlib
    import io

    import metrics

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = metrics.main([str(a) for a in args])
        except SystemExit as e:  # argparse's errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),
        ("a cat, an apple and the dog.", "cat apple and dog"),
        ("  lots \t of\n  space  ", "lots of space"),
        ("Hello, World!", "hello world"),
        ("theory another", "theory another"),  # whole words only
        ("the-end", "theend"),  # punctuation removed before articles
        ("", ""),
        ("The the A an", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- exact / f1


def test_exact_match_ignores_case_punctuation_articles_whitespace():
    assert exact_match_score("The  Eiffel Tower!", "eiffel tower")
    assert not exact_match_score("Eiffel Tower", "Tower Eiffel x")


def test_f1_hand_computed():
    # precision 2/2, recall 2/3 -> f1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # precision 1/3, recall 1/1 -> f1 = 0.5
    assert f1_score("cat on mat", "cat") == pytest.approx(0.5)
    # repeated tokens count via bag intersection: common = {x: 1}
    # precision 1/2, recall 1/1 -> 2/3
    assert f1_score("x x", "x") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0
    assert f1_score("Cat.", "the cat") == pytest.approx(1.0)


def test_empty_strings():
    assert not exact_match_score("", "cat")
    assert f1_score("", "cat") == 0
    assert f1_score("cat", "") == 0
    # Both normalize to '': EM says equal, but the official F1 is 0 (num_same == 0).
    assert exact_match_score("", "")
    assert exact_match_score("the", "")
    assert f1_score("", "") == 0
    assert f1_score("the", "a") == 0


def test_metric_max_over_ground_truths():
    truths = ["dog", "a cat sat down", "the cat sat"]
    assert metric_max_over_ground_truths(exact_match_score, "cat sat", truths) == 1
    assert metric_max_over_ground_truths(
        f1_score, "cat sat", ["dog", "a cat sat down"]
    ) == pytest.approx(0.8)
    assert metric_max_over_ground_truths(f1_score, "bird", truths) == 0


# ---------------------------------------------------------------- evaluate


def test_evaluate_perfect_and_partial():
    data = make_dataset({"q1": ["Paris"], "q2": ["a cat sat down", "kitten"]})
    assert evaluate(data, {"q1": "paris.", "q2": "kitten"}) == {"exact_match": 100.0, "f1": 100.0}
    result = evaluate(data, {"q1": "Paris", "q2": "the cat sat"})
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 0.8) / 2)


def test_evaluate_missing_predictions_count_as_zero(capsys):
    data = make_dataset({"q1": ["Paris"], "q2": ["Rome"], "q3": ["Oslo"], "q4": ["Bern"]})
    result = evaluate(data, {"q1": "Paris"})
    assert result == {"exact_match": pytest.approx(25.0), "f1": pytest.approx(25.0)}
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "3" in err and "q2" in err and "q3" in err and "q4" in err


def test_evaluate_ignores_extra_predictions(capsys):
    data = make_dataset({"q1": ["Paris"], "q2": ["Rome"]})
    result = evaluate(data, {"q1": "Paris", "other": "x", "q2": "Oslo", "more": "y"})
    assert result == {"exact_match": 50.0, "f1": 50.0}
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "2" in lines[0] and "other" in lines[0] and "more" in lines[0]


def test_evaluate_refuses_unanswerable_questions():
    with pytest.raises(ValueError, match="evaluate_v2"):
        evaluate(make_dataset({"q1": ["Paris"], "q2": []}), {"q1": "Paris", "q2": ""})


def test_evaluate_empty_dataset_raises():
    with pytest.raises(ValueError):
        evaluate([], {})


# ---------------------------------------------------------------- loaders


def test_load_squad_json_ok_without_version(tmp_path):
    data = make_dataset({"q1": ["Paris"]})
    path = write_json(tmp_path / "d.json", {"data": data})
    assert load_squad_json(path) == data


@pytest.mark.parametrize(
    "root, fragment",
    [
        ({"version": "1.1"}, "'data'"),
        ({"data": [{"title": "T"}]}, "'paragraphs'"),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, "'context'"),
        ({"data": [{"paragraphs": [{"context": "c"}]}]}, "'qas'"),
        (
            {
                "data": [
                    {"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": []}]}]}
                ]
            },
            "'id'",
        ),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "answers": []}]}]}]},
            "'question'",
        ),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x", "question": "q"}]}]}]},
            "'answers'",
        ),
        ({"data": []}, "no questions"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": []}]}]}, "no questions"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_load_squad_json_format_errors(tmp_path, root, fragment):
    path = write_json(tmp_path / "bad.json", root)
    with pytest.raises(SquadFormatError) as excinfo:
        load_squad_json(path)
    message = str(excinfo.value)
    assert str(path) in message and fragment in message
    assert isinstance(excinfo.value, ValueError)


def test_load_squad_json_unreadable_and_malformed(tmp_path):
    with pytest.raises(SquadFormatError, match="cannot read"):
        load_squad_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(SquadFormatError, match="malformed JSON"):
        load_squad_json(bad)


def test_load_predictions(tmp_path):
    good = write_json(tmp_path / "p.json", {"q1": "Paris"})
    assert load_predictions(good) == {"q1": "Paris"}
    with pytest.raises(SquadFormatError, match="JSON object"):
        load_predictions(write_json(tmp_path / "list.json", ["Paris"]))
    with pytest.raises(SquadFormatError, match="must be a string, got 3$"):
        load_predictions(write_json(tmp_path / "num.json", {"q1": 3}))
    with pytest.raises(SquadFormatError, match=r"must be a string, got \[0, 0, .{40,}$") as e:
        load_predictions(write_json(tmp_path / "long.json", {"q1": [0] * 1000}))
    assert len(str(e.value)) < 200


# ---------------------------------------------------------------- legacy token metric


def test_legacy_token_metrics():
    samples = [
        ([["the", "cat"], ["cat"]], ["cat"]),  # exact, f1 1 via the second truth
        ([["a", "cat", "sat", "down"]], ["cat", "sat"]),  # f1 2*1*0.5/1.5 = 2/3
        ([["dog"]], ["bird"]),  # f1 0
    ]
    assert compute_qa_exact(samples) == pytest.approx(100 / 3)
    assert compute_qa_f1(samples) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        compute_qa_f1([])
    with pytest.raises(ValueError):
        compute_qa_exact([])


def test_legacy_exact_normalizes_joined_tokens():
    # The old example joins the tokens and applies SQuAD's normalization before comparing.
    assert compute_qa_exact([([["the", "bowl"]], ["bowl"])]) == 100.0
    assert compute_qa_exact([([["Bowl"]], ["bowl"])]) == 100.0
    assert compute_qa_exact([([["Super", "Bowl", "."]], ["super", "bowl"])]) == 100.0
    assert compute_qa_exact([([["bowl"]], ["bowls"])]) == 0.0
    assert compute_qa_exact([([[]], [])]) == 100.0


def test_legacy_f1_compares_tokens_as_given():
    # Its F1 does not normalize (unlike its exact match): "the" and "Bowl" are tokens.
    # gold [the, bowl] vs [bowl]: precision 1/1, recall 1/2 -> 2/3
    assert compute_qa_f1([([["the", "bowl"]], ["bowl"])]) == pytest.approx(100 * 2 / 3)
    assert compute_qa_f1([([["Bowl"]], ["bowl"])]) == 0.0
    # Empty lists follow the v2.0 rule: both empty is a match, one empty is not.
    assert compute_qa_f1([([[]], [])]) == 100.0
    assert compute_qa_f1([([[]], ["bowl"])]) == 0.0
    assert compute_qa_f1([([["bowl"]], [])]) == 0.0
    assert compute_qa_f1([([[], ["bowl"]], [])]) == 100.0


# ---------------------------------------------------------------- CLI


def test_cli_prints_one_json_line(tmp_path):
    data = write_json(
        tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"], "q2": ["a cat sat down"]})}
    )
    preds = write_json(tmp_path / "p.json", {"q1": "Paris", "q2": "the cat sat"})
    proc = run_script(data, preds)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"exact_match", "f1"}
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(90.0)


def test_cli_missing_prediction_still_succeeds(tmp_path):
    data = write_json(
        tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"], "q2": ["Rome"]})}
    )
    preds = write_json(tmp_path / "p.json", {"q1": "Paris"})
    proc = run_cli(data, preds)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"exact_match": 50.0, "f1": 50.0}
    assert len(proc.stderr.strip().splitlines()) == 1 and "q2" in proc.stderr


def _assert_clean_error(proc, *fragments):
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_fails_when_no_prediction_is_of_the_dataset(tmp_path, capsys):
    """Predictions of another dataset would score 0 as if that were a result: exit 2 and
    one line naming the file; one matching id is enough to score (the rest count 0)."""
    import metrics

    data = write_json(tmp_path / "d.json", {"version": "1.1", "data": make_dataset(
        {"q1": ["Paris"], "q2": ["Rome"]})})
    other = write_json(tmp_path / "other.json", {"x1": "Paris", "x2": "Rome"})
    assert metrics.main([str(data), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other}: none of its 2 prediction id(s) is a question of "
                          f"{data} (ids: x1, x2)") and err.count("\n") == 1
    assert metrics.main([str(data), str(write_json(tmp_path / "empty.json", {}))]) == 2
    assert "none of its 0 prediction id(s)" in capsys.readouterr().err
    assert metrics.main([str(data), str(write_json(tmp_path / "one.json", {"q1": "Paris"}))]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": 50.0, "f1": 50.0}


def test_cli_malformed_json(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("{not json", encoding="utf-8")
    preds = write_json(tmp_path / "p.json", {})
    _assert_clean_error(run_cli(data, preds), "malformed JSON", "d.json")


def test_cli_malformed_predictions(tmp_path):
    data = write_json(tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"]})})
    preds = tmp_path / "p.json"
    preds.write_text("[", encoding="utf-8")
    _assert_clean_error(run_cli(data, preds), "p.json")


def test_cli_missing_keys(tmp_path):
    data = write_json(
        tmp_path / "d.json", {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x"}]}]}]}
    )
    preds = write_json(tmp_path / "p.json", {})
    _assert_clean_error(run_cli(data, preds), "'question'")


def test_cli_empty_dataset(tmp_path):
    data = write_json(tmp_path / "d.json", {"version": "1.1", "data": []})
    preds = write_json(tmp_path / "p.json", {})
    _assert_clean_error(run_cli(data, preds), "no questions")


def test_cli_ignores_unknown_prediction_ids(tmp_path):
    # As the official script does: only dataset questions are scored; the rest is reported.
    data = write_json(tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"], "q2": ["Rome"]})})
    unknown = {f"bogus{i}": "Paris" for i in range(7)}
    preds = write_json(tmp_path / "p.json", {"q1": "Paris", **unknown, "q2": "Oslo"})
    proc = run_cli(data, preds)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"exact_match": 50.0, "f1": 50.0}
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "7" in lines[0] and "bogus0" in lines[0] and "bogus4" in lines[0]
    assert "bogus5" not in lines[0]  # only the first few are named


def test_cli_missing_file(tmp_path):
    preds = write_json(tmp_path / "p.json", {})
    _assert_clean_error(run_cli(tmp_path / "nope.json", preds), "nope.json")


# ---------------------------------------------------------------- real data


@needs_real(NOTRE_DAME)
def test_notre_dame_gold_and_empty_predictions(capsys):
    data = load_squad_json(NOTRE_DAME)
    questions = list(iter_questions(data))
    assert questions
    gold = {qa["id"]: qa["answers"][0]["text"] for qa in questions}
    result = evaluate(data, gold)
    assert result["exact_match"] == pytest.approx(100.0)
    assert result["f1"] == pytest.approx(100.0)
    empty = evaluate(data, {qid: "" for qid in gold})
    assert empty == {"exact_match": 0.0, "f1": 0.0}
    assert capsys.readouterr().err == ""  # nothing unanswered


# ---------------------------------------------------------------- SQuAD v2.0


def test_f1_score_v2_empty_answers():
    assert f1_score_v2("", "") == 1  # both "no answer"
    assert f1_score_v2("The.", "a") == 1  # both normalize to ''
    assert f1_score_v2("", "Paris") == 0  # no answer predicted, one expected
    assert f1_score_v2("Paris", "") == 0  # an answer predicted, none expected
    # Otherwise as v1.1: precision 2/2, recall 2/3 -> 0.8
    assert f1_score_v2("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert f1_score_v2("dog", "cat") == 0


def test_has_unanswerable():
    assert not has_unanswerable(make_dataset({"q1": ["Paris"]}, v2=True))
    assert has_unanswerable(make_dataset({"q1": ["Paris"], "q2": []}, v2=True))
    assert has_unanswerable(make_dataset({"q1": []}))  # an empty list alone is enough


def test_evaluate_v2_scores_and_split(capsys):
    data = make_dataset(
        {"a1": ["cat sat"], "n1": [], "a2": ["big red dog"], "a3": ["Paris"], "n2": []}, v2=True
    )
    predictions = {"a1": "The cat sat.", "n1": "dog", "a2": "red dog", "a3": "Rome", "n2": ""}
    result = evaluate_v2(data, predictions)
    # exact: a1 1, n1 0, a2 0, a3 0, n2 1 -> 2/5
    # f1: a1 1, n1 0, a2 (precision 1, recall 2/3) 0.8, a3 0, n2 1 -> 2.8/5
    assert result == pytest.approx({
        "exact": 40.0, "f1": 56.0, "total": 5,
        "HasAns_exact": 100 / 3, "HasAns_f1": 100 * 1.8 / 3, "HasAns_total": 3,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    })
    assert list(result)[:3] == ["exact", "f1", "total"]
    assert capsys.readouterr().err == ""


def test_evaluate_v2_subset_keys_only_when_present():
    only_no_answer = evaluate_v2(make_dataset({"n1": [], "n2": []}), {"n1": "", "n2": "x"})
    assert only_no_answer == {
        "exact": 50.0, "f1": 50.0, "total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    }


def test_evaluate_v2_drops_blank_gold_answers():
    # An answer text that normalizes to '' is dropped, so "no answer" does not match it ...
    data = make_dataset({"q1": ["The", "Paris"], "n1": []})
    assert evaluate_v2(data, {"q1": "", "n1": ""})["HasAns_exact"] == 0.0
    assert evaluate_v2(data, {"q1": "paris", "n1": ""})["HasAns_exact"] == 100.0
    # ... unless none is left: then '' is the gold answer (the question still counts in HasAns).
    data = make_dataset({"q1": ["The", "."], "n1": []})
    assert evaluate_v2(data, {"q1": "", "n1": ""})["HasAns_exact"] == 100.0
    assert evaluate_v2(data, {"q1": "the", "n1": ""})["HasAns_f1"] == 100.0


def test_evaluate_v2_missing_prediction_counts_zero(capsys):
    data = make_dataset({"a1": ["Paris"], "n1": [], "a2": ["Rome"], "n2": []}, v2=True)
    result = evaluate_v2(data, {"a1": "Paris", "n1": "", "extra": "x"})
    assert result == {
        "exact": 50.0, "f1": 50.0, "total": 4,
        "HasAns_exact": 50.0, "HasAns_f1": 50.0, "HasAns_total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    }
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "2 of 4" in lines[0] and "a2" in lines[0] and "n2" in lines[0]
    assert "1" in lines[1] and "extra" in lines[1]


# A hand-made table for the no-answer threshold. Ordered by na_prob:
#   id   gold          prediction   raw exact  raw f1  na_prob
#   a1   cat sat       cat sat      1          1       0.1
#   a2   big red dog   red dog      0          0.8     0.2
#   n1   (none)        dog          0          0       0.3
#   a3   Paris         Rome         0          0       0.4
#   n2   (none)        ''           1          1       0.5
THRESH_DATA = {"a1": ["cat sat"], "a2": ["big red dog"], "n1": [], "a3": ["Paris"], "n2": []}
THRESH_PREDICTIONS = {"a1": "cat sat", "a2": "red dog", "n1": "dog", "a3": "Rome", "n2": ""}
THRESH_NA_PROBS = {"n2": 0.5, "a3": 0.4, "a1": 0.1, "n1": 0.3, "a2": 0.2}


def test_evaluate_v2_best_threshold_by_hand():
    result = evaluate_v2(make_dataset(THRESH_DATA, v2=True), THRESH_PREDICTIONS, THRESH_NA_PROBS)
    # Below every probability all five answer "no answer": n1 and n2 right, score 2.
    # exact walk: a1 +1 -> 3 (best, 0.1); a2 +0; n1 -1 (it answered "dog") -> 2; a3 +0;
    #   n2 +0 (it answered '') -> best 3/5 at 0.1.
    # f1 walk: a1 +1 -> 3 (0.1); a2 +0.8 -> 3.8 (best, 0.2); n1 -1 -> 2.8; a3, n2 +0.
    assert result["best_exact"] == pytest.approx(60.0)
    assert result["best_exact_thresh"] == 0.1
    assert result["best_f1"] == pytest.approx(76.0)
    assert result["best_f1_thresh"] == 0.2
    # The threshold leaves the plain scores alone at its default 1.0 ...
    assert result["exact"] == pytest.approx(40.0) and result["f1"] == pytest.approx(56.0)
    assert list(result)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]


def test_evaluate_v2_applies_threshold():
    # ... and at 0.25 turns n1, a3 and n2 into "no answer": n1 1.0, a3 0.0, n2 1.0.
    # exact: a1 1 + a2 0 + 1 + 0 + 1 = 3; f1: 1 + 0.8 + 1 + 0 + 1 = 3.8 (the best f1 above)
    data = make_dataset(THRESH_DATA, v2=True)
    result = evaluate_v2(data, THRESH_PREDICTIONS, THRESH_NA_PROBS, na_prob_thresh=0.25)
    assert result["exact"] == pytest.approx(60.0) and result["f1"] == pytest.approx(76.0)
    assert result["HasAns_exact"] == pytest.approx(100 / 3)
    assert result["NoAns_exact"] == 100.0 and result["NoAns_f1"] == 100.0
    # A probability equal to the threshold does not exceed it: at 0.3 only a3 (0.0) and
    # n2 (1.0) turn, n1 stays wrong: 1 + 0 + 0 + 0 + 1.
    at_n1 = evaluate_v2(data, THRESH_PREDICTIONS, THRESH_NA_PROBS, na_prob_thresh=0.3)
    assert at_n1["exact"] == pytest.approx(40.0)
    # Without na_probs every probability is 0.0, as in the official script.
    below_zero = evaluate_v2(data, THRESH_PREDICTIONS, na_prob_thresh=-1)
    # (all answered "no answer": n1, n2 right)
    assert below_zero["exact"] == pytest.approx(40.0) and below_zero["f1"] == pytest.approx(40.0)
    assert "best_exact" not in below_zero


def test_best_threshold_ties_follow_na_probs_order():
    # The official walk takes equal probabilities one at a time, in the file's order, and
    # records a threshold only on a strict improvement.
    data = make_dataset({"a": ["Paris"], "n": []}, v2=True)
    predictions = {"a": "Paris", "n": "Rome"}
    # a first: 1 -> 2 (best, 0.5), then n -> 1: best 2/2
    first = evaluate_v2(data, predictions, {"a": 0.5, "n": 0.5})
    assert (first["best_exact"], first["best_exact_thresh"]) == (100.0, 0.5)
    # n first: 1 -> 0, then a -> 1, never above the start: best 1/2 at the initial 0.0
    second = evaluate_v2(data, predictions, {"n": 0.5, "a": 0.5})
    assert (second["best_exact"], second["best_exact_thresh"]) == (50.0, 0.0)


def test_best_threshold_with_missing_prediction():
    # n2 has no prediction: it scores 0 at every threshold and stays in the denominator.
    data = make_dataset({"a1": ["Paris"], "n1": [], "n2": []}, v2=True)
    result = evaluate_v2(data, {"a1": "Paris", "n1": "x"}, {"a1": 0.1, "n1": 0.2})
    # start 1 (n1); a1 +1 -> 2 (best, 0.1); n1 -1 -> 1
    assert result["best_exact"] == pytest.approx(200 / 3)
    assert result["best_exact_thresh"] == 0.1


def test_evaluate_v2_needs_na_prob_for_every_prediction():
    data = make_dataset(THRESH_DATA, v2=True)
    partial = {"a1": 0.1, "a2": 0.2, "extra": 0.3}
    with pytest.raises(ValueError, match=r"lack 3 .*n1, a3, n2"):
        evaluate_v2(data, THRESH_PREDICTIONS, partial)
    # A question without a prediction needs no probability.
    assert evaluate_v2(data, {"a1": "cat sat"}, {"a1": 0.1})["total"] == 5


# ------------------------------------------------ SQuAD v2.0 input files


def test_load_squad_json_v2(tmp_path):
    data = make_dataset({"a": ["Paris"], "n": []}, v2=True)
    data[0]["paragraphs"][0]["qas"][1]["plausible_answers"] = [{"text": "Rome"}]
    path = write_json(tmp_path / "d.json", {"version": "v2.0", "data": data})
    assert load_squad_json(path) == data
    assert has_unanswerable(load_squad_json(path))


def _v2_file_with(tmp_path, **qa_fields):
    qa = {"id": "x", "question": "q", "answers": [], **qa_fields}
    root = {"data": [{"paragraphs": [{"context": "c", "qas": [qa]}]}]}
    return write_json(tmp_path / "bad.json", root)


@pytest.mark.parametrize(
    "qa_fields, fragments",
    [
        ({"is_impossible": "yes"}, ("'is_impossible'", "bool", "str")),
        ({"is_impossible": None}, ("'is_impossible'", "bool")),
        ({"is_impossible": False}, ("'is_impossible' false", "empty 'answers'")),
        ({"is_impossible": True, "answers": [{"text": "a"}]}, ("'is_impossible' true", "1 answer")),
        ({"is_impossible": True, "answers": [{"txt": "a"}]}, ("answer 0", "'text'")),
    ],
)
def test_load_squad_json_v2_format_errors(tmp_path, qa_fields, fragments):
    path = _v2_file_with(tmp_path, **qa_fields)
    with pytest.raises(SquadFormatError) as excinfo:
        load_squad_json(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and "(id x)" in message
    for fragment in fragments:
        assert fragment in message


def test_load_na_probs(tmp_path):
    assert load_na_probs(write_json(tmp_path / "ok.json", {"a": 0.5, "b": 1})) == {"a": 0.5, "b": 1}
    with pytest.raises(SquadFormatError, match="JSON object"):
        load_na_probs(write_json(tmp_path / "list.json", [0.5]))
    for bad in ("0.5", True, None):
        with pytest.raises(SquadFormatError, match="'a' must be a finite number"):
            load_na_probs(write_json(tmp_path / "bad.json", {"a": bad}))
    nan = tmp_path / "nan.json"
    nan.write_text('{"a": NaN}', encoding="utf-8")
    with pytest.raises(SquadFormatError, match="finite number"):
        load_na_probs(nan)


# ------------------------------------------------ SQuAD v2.0 command line


def test_cli_v2_prints_official_keys(tmp_path):
    data = write_json(tmp_path / "d.json", {"data": make_dataset(THRESH_DATA, v2=True)})
    preds = write_json(tmp_path / "p.json", THRESH_PREDICTIONS)
    na_probs = write_json(tmp_path / "na.json", THRESH_NA_PROBS)
    proc = run_cli(data, preds, "--na-prob-file", na_probs)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and proc.stderr == ""
    result = json.loads(proc.stdout)
    assert list(result) == [
        "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
        "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
    ]
    assert result["exact"] == pytest.approx(40.0)
    assert result["best_f1"] == pytest.approx(76.0) and result["best_f1_thresh"] == 0.2
    thresholded = json.loads(run_cli(data, preds, "--na-prob-file", na_probs,
                                     "--na-prob-thresh", "0.25").stdout)
    assert thresholded["exact"] == pytest.approx(60.0)
    assert set(json.loads(run_cli(data, preds).stdout)) == set(result) - {
        "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"
    }


def test_cli_v2_errors(tmp_path):
    v2 = write_json(tmp_path / "v2.json", {"data": make_dataset(THRESH_DATA, v2=True)})
    v1 = write_json(tmp_path / "v1.json", {"data": make_dataset({"q1": ["Paris"]})})
    preds = write_json(tmp_path / "p.json", THRESH_PREDICTIONS)
    lacking = write_json(tmp_path / "lacking.json", {"a1": 0.1})
    nan = tmp_path / "nan.json"
    nan.write_text('{"a1": NaN}', encoding="utf-8")
    _assert_clean_error(run_cli(v2, preds, "--na-prob-file", lacking), "lack 4")
    _assert_clean_error(run_cli(v2, preds, "--na-prob-file", nan), "nan.json", "finite")
    _assert_clean_error(run_cli(v2, preds, "--na-prob-file", tmp_path / "no.json"), "no.json")
    _assert_clean_error(run_cli(v2, preds, "--na-prob-thresh", "nan"), "--na-prob-thresh")
    _assert_clean_error(run_cli(v1, preds, "--na-prob-file", lacking), "v2.0 data only")
    _assert_clean_error(run_cli(v1, preds, "--na-prob-thresh", "0.5"), "v2.0 data only")
    _assert_clean_error(run_cli(_v2_file_with(tmp_path, is_impossible=1), preds), "bool")


# ------------------------------------------------ SQuAD v2.0 against the official script
#
# The official evaluate-v2.0.py cannot be fetched here, so this is an independent, literal
# re-implementation of its functions, kept in its shape on purpose (it is the oracle, not
# code to share with metrics.py). It needs a prediction for every question, as the
# official script does (it stops with a KeyError otherwise).


def official_get_tokens(s):
    if not s:
        return []
    return normalize_answer(s).split()


def official_compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def official_compute_f1(a_gold, a_pred):
    gold_toks = official_get_tokens(a_gold)
    pred_toks = official_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_get_raw_scores(dataset, preds):
    exact_scores = {}
    f1_scores = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
                if not gold_answers:
                    gold_answers = [""]
                if qid not in preds:
                    continue
                a_pred = preds[qid]
                exact_scores[qid] = max(official_compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(official_compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def official_apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def official_make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict([
            ("exact", 100.0 * sum(exact_scores.values()) / total),
            ("f1", 100.0 * sum(f1_scores.values()) / total),
            ("total", total),
        ])
    total = len(qid_list)
    return collections.OrderedDict([
        ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
        ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
        ("total", total),
    ])


def official_merge_eval(main_eval, new_eval, prefix):
    for k in new_eval:
        main_eval[f"{prefix}_{k}"] = new_eval[k]


def official_find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            if preds[qid]:
                diff = -1
            else:
                diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def official_main(dataset, preds, na_probs=None, na_prob_thresh=1.0):
    na_prob_file = na_probs is not None
    if not na_prob_file:
        na_probs = {k: 0.0 for k in preds}
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = official_get_raw_scores(dataset, preds)
    exact_thresh = official_apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans,
                                                   na_prob_thresh)
    f1_thresh = official_apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = official_make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        has_ans_eval = official_make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids)
        official_merge_eval(out_eval, has_ans_eval, "HasAns")
    if no_ans_qids:
        no_ans_eval = official_make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids)
        official_merge_eval(out_eval, no_ans_eval, "NoAns")
    if na_prob_file:
        best_exact, exact_thresh = official_find_best_thresh(preds, exact_raw, na_probs,
                                                             qid_to_has_ans)
        best_f1, f1_thresh = official_find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
        out_eval["best_exact"] = best_exact
        out_eval["best_exact_thresh"] = exact_thresh
        out_eval["best_f1"] = best_f1
        out_eval["best_f1_thresh"] = f1_thresh
    return out_eval


def synthetic_v2_dataset(rng, n_questions=120):
    """A SQuAD v2.0 ``data`` list of random words, about half the questions unanswerable."""
    words = ["the", "a", "Norman", "duke", "Rollo", "911", "river", "Seine", "of", "an",
             "king", "France", "William", "conquest", "castle", "Paris", "bishop", "abbey"]
    paragraphs = []
    for p in range(n_questions // 6):
        context = " ".join(rng.choice(words) for _ in range(40)) + "."
        qas = []
        for q in range(6):
            answers = []
            if rng.random() < 0.5:
                for _ in range(rng.randint(1, 4)):
                    start = rng.randrange(40)
                    span = context.split()[start:start + rng.randint(1, 4)]
                    # Now and then an answer that normalizes to '' (the official script drops it).
                    text = "the" if rng.random() < 0.1 else " ".join(span)
                    answers.append({"text": text, "answer_start": 0})
            qas.append({"id": f"p{p}q{q}", "question": "?", "answers": answers,
                        "is_impossible": not answers})
        paragraphs.append({"context": context, "qas": qas})
    return [{"title": "synthetic", "paragraphs": paragraphs}]


def random_predictions(rng, dataset):
    """A prediction for every question, drawn to hit every branch of the official rules:
    a gold answer (sometimes re-cased and punctuated), '' (no answer), a piece of the
    context, an answer of another question, and 'the' (empty once normalized, but not
    empty text); plus ids of no question."""
    questions = [(p["context"], qa) for a in dataset for p in a["paragraphs"] for qa in p["qas"]]
    all_answers = [a["text"] for _, qa in questions for a in qa["answers"]]
    predictions = {}
    for context, qa in questions:
        choice = rng.randrange(6)
        if choice == 0 and qa["answers"]:
            text = rng.choice(qa["answers"])["text"]
            predictions[qa["id"]] = text.upper() + "." if rng.random() < 0.3 else text
        elif choice == 1:
            predictions[qa["id"]] = ""
        elif choice == 2:
            tokens = context.split()
            start = rng.randrange(len(tokens))
            predictions[qa["id"]] = " ".join(tokens[start:start + rng.randint(1, 6)])
        elif choice == 3:
            predictions[qa["id"]] = rng.choice(all_answers)
        else:
            predictions[qa["id"]] = "the"
    predictions.update({f"unknown{i}": "x" for i in range(3)})
    return predictions


@pytest.mark.parametrize("seed", range(12))
def test_evaluate_v2_matches_official_script(seed, capsys):
    rng = random.Random(seed)
    dataset = load_squad_json(NORMANS) if NORMANS.exists() else synthetic_v2_dataset(rng)
    predictions = random_predictions(rng, dataset)
    # One decimal: many equal probabilities, so the tie order is exercised.
    na_probs = {qid: round(rng.random(), 1) for qid in rng.sample(list(predictions),
                                                                  len(predictions))}
    thresh = rng.choice([1.0, 0.5, 0.3, 0.0])
    for probs in (None, na_probs):
        ours = evaluate_v2(dataset, predictions, probs, thresh)
        official = official_main(dataset, predictions, probs, thresh)
        assert list(ours.items()) == list(official.items())  # same keys, order, floats
    assert "Ignored predictions: 3" in capsys.readouterr().err


# ------------------------------------------------ SQuAD v2.0 on the real Normans slice

needs_normans = needs_real(NORMANS)


@pytest.fixture
def normans():
    """(dataset, {id: qa}, answerable ids, unanswerable ids) of the Normans v2.0 slice."""
    dataset = load_squad_json(NORMANS)
    questions = list(iter_questions(dataset))
    answerable = [qa["id"] for qa in questions if qa["answers"]]
    unanswerable = [qa["id"] for qa in questions if not qa["answers"]]
    return dataset, {qa["id"]: qa for qa in questions}, answerable, unanswerable


@needs_normans
def test_normans_counts_and_gold(normans):
    dataset, by_id, answerable, unanswerable = normans
    assert has_unanswerable(dataset)
    assert (len(by_id), len(answerable), len(unanswerable)) == (208, 96, 112)
    gold = {qid: by_id[qid]["answers"][0]["text"] for qid in answerable}
    gold.update({qid: "" for qid in unanswerable})
    assert evaluate_v2(dataset, gold) == {
        "exact": 100.0, "f1": 100.0, "total": 208,
        "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 96,
        "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 112,
    }


@needs_normans
def test_normans_wrong_no_answers_and_threshold(normans, tmp_path):
    dataset, by_id, answerable, unanswerable = normans
    # Gold for the 96 answerable, a made-up answer for the 112 unanswerable ones.
    predictions = {qid: by_id[qid]["answers"][0]["text"] for qid in answerable}
    predictions.update({qid: "Charlemagne's horse" for qid in unanswerable})
    na_probs = {qid: 0.75 if qid in unanswerable else 0.25 for qid in by_id}
    result = evaluate_v2(dataset, predictions, na_probs)
    assert result["exact"] == pytest.approx(100 * 96 / 208)
    assert result["HasAns_exact"] == 100.0 and result["NoAns_exact"] == 0.0
    # Start at 112 (all "no answer"); the 96 answerable at 0.25 add one each -> 208 at 0.25,
    # the 112 at 0.75 take one each.
    assert (result["best_exact"], result["best_exact_thresh"]) == (100.0, 0.25)
    assert (result["best_f1"], result["best_f1_thresh"]) == (100.0, 0.25)
    # Above 0.5 the unanswerable ones count as "no answer": everything right.
    assert evaluate_v2(dataset, predictions, na_probs, 0.5)["exact"] == 100.0
    # The command line gives the same numbers.
    proc = run_cli(NORMANS, write_json(tmp_path / "p.json", predictions),
                   "--na-prob-file", write_json(tmp_path / "na.json", na_probs))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pytest.approx(result)


@needs_normans
def test_normans_missing_predictions(normans, capsys):
    dataset, by_id, answerable, unanswerable = normans
    # No answer for every question, but 12 unanswerable ones left out: they score 0.
    predictions = {qid: "" for qid in answerable + unanswerable[12:]}
    result = evaluate_v2(dataset, predictions)
    assert result["total"] == 208 and result["NoAns_total"] == 112
    assert result["exact"] == pytest.approx(100 * 100 / 208)
    assert result["NoAns_exact"] == pytest.approx(100 * 100 / 112)
    assert result["HasAns_exact"] == 0.0 and result["HasAns_f1"] == 0.0
    assert "12 of 208" in capsys.readouterr().err
