import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import metrics  # noqa: E402
from metrics import (  # noqa: E402
    SquadFormatError,
    compute_qa_exact,
    compute_qa_f1,
    evaluate,
    exact_match_score,
    f1_score,
    load_predictions,
    load_squad_json,
    metric_max_over_ground_truths,
    normalize_answer,
)

NOTRE_DAME = REPO.parent / "shared/data/squad/train-v1.1-notre-dame.json"


def make_dataset(qas_answers):
    """SQuAD ``data`` list with one paragraph holding {id: [answer texts]}."""
    qas = [
        {
            "id": qid,
            "question": f"q {qid}?",
            "answers": [{"text": t, "answer_start": 0} for t in texts],
        }
        for qid, texts in qas_answers.items()
    ]
    return [{"title": "T", "paragraphs": [{"context": "ctx", "qas": qas}]}]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "metrics.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


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


def test_evaluate_ignores_extra_predictions():
    data = make_dataset({"q1": ["Paris"]})
    assert evaluate(data, {"q1": "Paris", "other": "x"})["exact_match"] == 100.0


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
    with pytest.raises(SquadFormatError, match="must be a string"):
        load_predictions(write_json(tmp_path / "num.json", {"q1": 3}))


# ---------------------------------------------------------------- legacy token metric


def test_legacy_token_metrics():
    samples = [
        ([["the", "cat"], ["cat"]], ["cat"]),  # exact via second truth, f1 1
        ([["a", "cat", "sat", "down"]], ["cat", "sat"]),  # f1 2*1*0.5/1.5 = 2/3
        ([["dog"]], ["bird"]),  # f1 0
    ]
    assert compute_qa_exact(samples) == pytest.approx(100 / 3)
    assert compute_qa_f1(samples) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    # No normalization in the legacy metric: case and articles matter.
    assert compute_qa_exact([([["Cat"]], ["cat"])]) == 0.0
    with pytest.raises(ValueError):
        compute_qa_f1([])


# ---------------------------------------------------------------- CLI


def test_cli_prints_one_json_line(tmp_path):
    data = write_json(
        tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"], "q2": ["a cat sat down"]})}
    )
    preds = write_json(tmp_path / "p.json", {"q1": "Paris", "q2": "the cat sat"})
    proc = run_cli(data, preds)
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


def test_cli_unknown_prediction_ids(tmp_path):
    data = write_json(tmp_path / "d.json", {"data": make_dataset({"q1": ["Paris"]})})
    preds = write_json(tmp_path / "p.json", {"q1": "Paris", "bogus": "x"})
    _assert_clean_error(run_cli(data, preds), "bogus")


def test_cli_missing_file(tmp_path):
    preds = write_json(tmp_path / "p.json", {})
    _assert_clean_error(run_cli(tmp_path / "nope.json", preds), "nope.json")


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not NOTRE_DAME.exists(), reason=f"{NOTRE_DAME} not present")
def test_notre_dame_gold_and_empty_predictions(capsys):
    data = load_squad_json(NOTRE_DAME)
    questions = list(metrics.iter_questions(data))
    assert questions
    gold = {qa["id"]: qa["answers"][0]["text"] for qa in questions}
    result = evaluate(data, gold)
    assert result["exact_match"] == pytest.approx(100.0)
    assert result["f1"] == pytest.approx(100.0)
    empty = evaluate(data, {qid: "" for qid in gold})
    assert empty == {"exact_match": 0.0, "f1": 0.0}
    assert capsys.readouterr().err == ""  # nothing unanswered
