"""The evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

import _train_fixtures as fx
from flatlora.train.metrics import (classification_metrics, exact_match, extract_final_number, gsm8k_accuracy,
                                    official_gsm8k_number)


@pytest.mark.parametrize("text, number", [
    ("#### 1,234", "1234"),                                   # GSM8K's thousands comma
    ("so the total is 1,000 + 234\n#### 1,234", "1234"),        # the number after ####, not the last one
    ("#### -5", "-5"),                                        # negatives
    ("3 - 8 = -5\n#### −5", "-5"),                            # a unicode minus
    ("#### 3.50", "3.5"),                                     # decimals compare as exact decimals
    ("#### .25", "0.25"),
    ("#### $1,234.50", "1234.5"),                             # a dollar sign
    ("#### 1,000,000", "1000000"),
    ("#### 72\nThe answer is: 71", "72"),                     # #### wins over "The answer is"
    ("It is 10 - 3 = 7. The answer is: 7", "7"),              # MetaMathQA's last line
    ("the answer is 12 apples, not 13", "12"),                # first number after the marker
    ("10 - 3 = 7", "7"),                                      # no marker: the last number
    ("3-5", "5"),                                             # a minus right after a digit is subtraction
    ("1234,567", "567"),                                      # not a thousands comma (4 digits before it)
    ("48/2 = 24 clips", "24"),
    ("no number here", None),
    ("#### none", None),
    ("", None),
])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_gsm8k_accuracy_on_hand_made_answers():
    refs = [answer for _, answer, _ in fx.GSM8K_TEST]
    assert [extract_final_number(r) for r in refs] == [gold for _, _, gold in fx.GSM8K_TEST]
    generations = [
        "1000 + 234 = 1234\n#### 1234",       # right (comma or not)
        "The answer is: -5",                  # right
        "#### 3.50",                          # right (3.50 = 3.5)
        "48 + 24 = 71\n#### 71",              # wrong
        "I do not know",                      # no number: wrong
    ]
    official, lenient, records = gsm8k_accuracy(generations, refs)
    assert lenient == 3 / 5
    assert [r["lenient_correct"] for r in records] == [True, True, True, False, False]
    assert [r["lenient_prediction"] for r in records] == ["1234", "-5", "3.5", "71", None]
    # the official scorer: references 1234, 5 (sign dropped), 3 (3.5 cut), 72, 0 (0.25 cut); the second answer has
    # no "####" and reads 0 (wrong), the fifth reads 0 and matches the reference's 0 (right)
    assert [r["reference"] for r in records] == [1234, 5, 3, 72, 0]
    assert [r["prediction"] for r in records] == [1234, 0, 3, 71, 0]
    assert [r["correct"] for r in records] == [True, False, True, False, True] and official == 3 / 5


@pytest.mark.parametrize("text, number", [
    ("#### 1,234", 1234), ("####7", 7), ("#### -5", 5), ("#### 3.5", 3), ("#### 72\nThe answer is: 71", 72),
    ("a #### 5 b #### 6", 5), ("The answer is: 7", 0), ("10 - 3 = 7", 0), ("", 0), ("#### $5", 0),
])
def test_official_gsm8k_number_is_the_official_extract_num(text, number):
    """nblt/Flat-LoRA eval_gsm8k_batch.py: re.search(r'####\\s*(\\d+)', text.replace(',', '')), else
    r'####\\s*-(\\d+)', else 0."""
    assert official_gsm8k_number(text) == number


def test_gsm8k_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="holds no number"):
        gsm8k_accuracy(["1"], ["no answer"])
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        gsm8k_accuracy(["1", "2"], ["#### 1"])


def test_binary_scores_by_hand():
    # TP = 3, FN = 1, FP = 2, TN = 4
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    got = classification_metrics(y_pred, y_true, ["accuracy", "f1", "matthews_correlation"])
    assert got["accuracy"] == pytest.approx(7 / 10)
    assert got["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))                       # 2TP / (2TP + FP + FN)
    assert got["matthews_correlation"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))


def test_multiclass_f1_is_the_macro_average():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FP 0, FN 1 -> 2/3
    got = classification_metrics(y_pred, y_true, ["f1", "accuracy"])
    assert got["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert got["accuracy"] == pytest.approx(4 / 6)


def test_exact_match_strips_white_space():
    assert exact_match([" a b", "c", "d "], ["a b", "x", "d"]) == pytest.approx(2 / 3)
