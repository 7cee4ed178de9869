"""posttrain.rl.rewards: answer extraction and matching, R1's accuracy / format / language-consistency rewards, the
`rl.rewards` plug-in loader and its one-line errors, the weighted total and the per-reward values for logging."""
import types

import pytest

from posttrain.rl import rewards as rw
from posttrain.rl.rewards import (RewardError, accuracy, extract_answer, format_reward, language_consistency,
                                  load_rewards, score, score_batch, words_by_script)
from pretrain.config import ConfigError


@pytest.mark.parametrize("text, answer", [
    ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                             # nested braces
    ("first \\boxed{3} then \\boxed{4}", "4"),                                     # the last box
    ("<think>hmm</think> <answer> 42 </answer>", "42"),
    ("<think>hmm</think><answer>7", "7"),                                           # unclosed tag: to the end
    ("Reasoning...\nAnswer: 1,000 apples\nthanks", "1,000 apples"),
    ("step 1\n#### 12", "12"),                                                      # GSM8K
    ("no final answer here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("completion, target, expected", [
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{-\\dfrac{3}{4}}", "-0.75", 1.0),
    ("<answer>1,000</answer>", 1000, 1.0),
    ("Answer: $12$.", "12", 1.0),
    ("<answer>50%</answer>", "0.5", 1.0),
    ("\\boxed{\\text{Paris}}", "paris", 1.0),
    ("\\boxed{13}", "12", 0.0),
    ("I don't know", "12", 0.0),
    ("\\boxed{x+1}", "1+x", 0.0),                                                   # symbolic: needs math-verify
])
def test_accuracy_exact_and_numeric(completion, target, expected, monkeypatch):
    monkeypatch.setattr(rw, "_math_verify", lambda: None)                          # the fallback, installed or not
    assert accuracy("q", completion, {"answer": target}) == expected


def test_accuracy_uses_math_verify_when_installed(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(parse=lambda s: s.replace(" ", ""),
                                 verify=lambda gold, pred: calls.append((gold, pred)) or sorted(gold) == sorted(pred))
    monkeypatch.setattr(rw, "_math_verify", lambda: fake)
    assert accuracy("q", "\\boxed{x+1}", {"answer": "1 + x"}) == 1.0
    assert calls == [("1+x", "x+1")]                                               # gold first, as math-verify wants
    broken = types.SimpleNamespace(parse=lambda s: 1 / 0, verify=None)
    monkeypatch.setattr(rw, "_math_verify", lambda: broken)
    assert accuracy("q", "\\boxed{x+1}", {"answer": "1+x"}) == 0.0                 # its errors mean "not equal"


@pytest.mark.parametrize("completion, expected", [
    ("<think>2+2 is 4</think> The answer is 4.", 1.0),
    ("  <think>\nreason\n</think>\n<answer>4</answer>", 1.0),
    ("<think>reason</think>", 0.0),                                                 # no answer
    ("<think>  </think> 4", 0.0),                                                   # blank reasoning
    ("The answer is 4 <think>late</think>", 0.0),                                   # not at the start
    ("<think>a</think> 4 <think>b</think> 5", 0.0),                                 # a second block
    ("<think>a <think> b</think> 4", 0.0),                                          # nested tag
    ("<think>a</think> <answer>4", 0.0),                                            # unclosed answer
    ("<think>a</think> <answer>4</answer> trailing", 0.0),
    ("just 4", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward("q", completion, {}) == expected


def test_language_consistency_is_the_share_of_target_script_words():
    assert words_by_script("I think 这是 it, 42 + x²!") == ["LATIN", "LATIN", "CJK", "CJK", "LATIN", "LATIN"]
    mixed = "<think>I think 这是 the answer</think> 答案 is 4"                       # only the reasoning counts
    assert language_consistency("q", mixed, {"language": "en"}) == pytest.approx(4 / 6)
    assert language_consistency("q", mixed, {"language": "zh"}) == pytest.approx(2 / 6)
    assert language_consistency("q", "привет world", {"language": "ru"}) == 0.5       # no think block: all of it
    assert language_consistency("q", "<think>これは日本語</think>", {"language": "ja"}) == 1.0
    assert language_consistency("q", "<think>12 + 4 = 16</think> 16", {}) == 0.0     # no word at all
    with pytest.raises(ValueError, match="language 'xx' is not one of"):
        language_consistency("q", "hi", {"language": "xx"})


# ------------------------------------------------------------------------------------------ loading and scoring

@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompt, completion, sample):\n    return len(completion) / 10\n"
        "def boom(prompt, completion, sample):\n    return 1 / 0 if 'id' in sample else 0.0\n"
        "def text(prompt, completion, sample):\n    return 'good' if 'id' in sample else 0.0\n"
        "def nan(prompt, completion, sample):\n    return float('nan') if 'id' in sample else 0.0\n"
        "def multiline(prompt, completion, sample):\n    raise RuntimeError('two\\nlines')\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_load_and_score_weighted_sum(plugin):
    rewards = load_rewards([{"fn": "accuracy", "weight": 1.0}, {"fn": "format", "weight": 0.5},
                            {"fn": "my_rewards:length", "weight": -0.1, "name": "len"},
                            {"fn": "posttrain.rl.rewards:language_consistency"}])
    assert [(r.name, r.weight) for r in rewards] == [("accuracy", 1.0), ("format_reward", 0.5), ("len", -0.1),
                                                    ("language_consistency", 1.0)]
    completion = "<think>two plus two</think> \\boxed{4}"                           # 37 characters
    total, values = score(rewards, "2+2?", completion, {"answer": "4"})
    assert values == {"accuracy": 1.0, "format_reward": 1.0, "len": 3.7, "language_consistency": 1.0}
    assert total == pytest.approx(1.0 + 0.5 - 0.37 + 1.0)
    totals, metrics = score_batch(rewards, ["2+2?"] * 2, [completion, "5"], [{"answer": "4"}] * 2)
    assert totals == pytest.approx([2.13, 0.1 * -0.1])
    assert metrics == pytest.approx({"rl/reward/accuracy": 0.5, "rl/reward/format_reward": 0.5,
                                     "rl/reward/len": 1.9, "rl/reward/language_consistency": 0.5})


@pytest.mark.parametrize("entries, message", [
    ([{"fn": "no_such_module_xyz:f"}], "rl.rewards[0].fn 'no_such_module_xyz:f': cannot import module "
                                       "'no_such_module_xyz'"),
    ([{"fn": "accuracy"}, {"fn": "my_rewards:missing"}], "rl.rewards[1].fn 'my_rewards:missing': module "
                                                         "'my_rewards' has no attribute 'missing'"),
    ([{"fn": "my_rewards:NOT_A_FUNCTION"}], "rl.rewards[0].fn 'my_rewards:NOT_A_FUNCTION' is a int, not a function"),
    ([{"fn": "broken_rewards:f"}], "rl.rewards[0].fn 'broken_rewards:f': cannot import module 'broken_rewards' "
                                   "(No module named 'does_not_exist_anywhere')"),
    ([{"fn": "my_rewards.length"}], "rl.rewards[0].fn 'my_rewards.length' must be 'module:function'"),
    ([{"fn": "accuracy", "weight": "high"}], "rl.rewards[0].weight must be a finite number, got 'high'"),
    ([{"fn": "accuracy", "wieght": 1}], "rl.rewards[0] has unknown key(s) ['wieght']"),
    ([{"weight": 1}], "rl.rewards[0] must be a mapping with an 'fn' key"),
    ([{"fn": "accuracy"}, {"fn": "rw:accuracy"}], "rl.rewards[1].fn 'rw:accuracy': cannot import module 'rw'"),
    ([{"fn": "accuracy"}, {"fn": "posttrain.rl.rewards:accuracy"}], "rl.rewards[1]: a second reward named "
                                                                    "'accuracy'"),
    ([], "rl.rewards must be a non-empty list"),
])
def test_loader_errors_are_one_line(plugin, entries, message):
    with pytest.raises(ConfigError) as error:
        load_rewards(entries)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("fn, message", [
    ("my_rewards:boom", "reward 'my_rewards:boom' raised ZeroDivisionError: division by zero on sample 3 "
                        "{'answer': '4', 'id': 'q-17'}"),
    ("my_rewards:text", "reward 'my_rewards:text' returned 'good' (str), expected a finite float, on sample 3"),
    ("my_rewards:nan", "reward 'my_rewards:nan' returned nan (float), expected a finite float, on sample 3"),
    ("my_rewards:multiline", "reward 'my_rewards:multiline' raised RuntimeError: two lines on sample 0"),
    ("accuracy", "reward 'accuracy' raised ValueError: the accuracy reward needs an 'answer' key"),
])
def test_reward_failures_name_the_function_and_the_sample_in_one_line(plugin, fn, message):
    rewards = load_rewards([{"fn": fn}])
    sample = {"answer": "4", "id": "q-17"} if fn != "accuracy" else {"id": "q-17"}      # only sample 3 fails
    with pytest.raises(RewardError) as error:
        score_batch(rewards, ["p"] * 4, ["c"] * 4, [{"answer": "4"}] * 3 + [sample])
    assert message in str(error.value) and "\n" not in str(error.value)
