"""Rewards for RL: the `rl.rewards` plug-ins and the built-in rule rewards of DeepSeek-R1 (§2.2.2 "Reward Modeling":
accuracy and format; §2.3.2 the language-consistency reward).

Config (CONTRACT.md): `rl.rewards: [{fn: "module:function", weight: w, name: optional}, ...]`; each function is
called as fn(prompt, completion, sample) -> float, where sample is the RL prompt's jsonl record (its other keys,
e.g. "answer", reach the function). The built-ins are `posttrain.rl.rewards:accuracy`, `:format_reward` and
`:language_consistency`, also reachable by the short names in BUILTINS. The total is Σ weight · value; each
reward's value is returned too, for `rl/reward/<name>`.

Every user error is one line: a bad entry is a ConfigError naming `rl.rewards[i]` and the fix; a reward that raises
or returns a non-number is a RewardError naming the function and the sample.
"""
import functools
import importlib
import math
import numbers
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from pretrain.config import ConfigError


class RewardError(ValueError):
    """A reward function failed on a sample; the message names the function and the sample, on one line."""


@dataclass(frozen=True)
class Reward:
    """One loaded `rl.rewards` entry."""
    name: str
    """Logged as rl/reward/<name>: the entry's `name`, else the function's name."""
    fn: Callable
    """fn(prompt, completion, sample) -> float."""
    weight: float
    """Its weight in the total reward."""
    spec: str
    """The `fn` string as configured (for error messages)."""


# ------------------------------------------------------------------------------------------------ answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_ANSWER_LINE = re.compile(r"(?:answer\s*:|####)\s*([^\n]*)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), None if there is none or it is unclosed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{…}`, else the last `<answer>…</answer>` (or to the end
    if unclosed), else the rest of the line after the last "answer:" (any case) or GSM8K's "####"; None if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    return lines[-1].strip() if lines else None


def _normalize(answer: str) -> str:
    """Spacing, every $ (math delimiters, currency), \\text{}, \\left/\\right, a trailing period and thousands
    commas removed, lower case."""
    s = answer.replace("$", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|!|,|;)", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _as_number(s: str) -> float | None:
    """A normalised answer as a number: int, decimal, a/b, \\frac{a}{b} / \\dfrac{a}{b}, a trailing %; else None."""
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)([\d.]+)/([\d.]+)", s)
    try:
        if frac:
            value = float(frac.group(2)) / float(frac.group(3))
            return -value if frac.group(1) else value
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, target: str) -> bool:
    """Exact match after `_normalize`, or numeric match (1/2 == 0.5 == \\frac{1}{2}, 1,000 == 1000.0) with
    relative tolerance 1e-9; with `math-verify` installed (optional extra), also its symbolic equivalence."""
    p, t = _normalize(predicted), _normalize(target)
    if p == t:
        return True
    pn, tn = _as_number(p), _as_number(t)
    if pn is not None and tn is not None and math.isclose(pn, tn, rel_tol=1e-9, abs_tol=1e-12):
        return True
    math_verify = _math_verify()
    if math_verify is None:
        return False
    try:  # math-verify's own parsing errors mean "not provably equal", never a crash of the run
        return bool(math_verify.verify(math_verify.parse(target), math_verify.parse(predicted)))
    except Exception:
        return False


@functools.cache
def _math_verify():
    """The optional `math_verify` module, or None; looked up once (a failed import is not cached by Python)."""
    try:
        return importlib.import_module("math_verify")
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------ built-ins

def accuracy(prompt, completion: str, sample: dict) -> float:
    """R1's accuracy reward: 1.0 when the completion's final answer (`extract_answer`) matches sample["answer"]
    (`answers_match`: exact or numeric, symbolic with math-verify), else 0.0 (no answer found counts as wrong)."""
    if "answer" not in sample:
        raise ValueError("the accuracy reward needs an 'answer' key in each RL prompt record")
    predicted = extract_answer(completion)
    return float(predicted is not None and answers_match(predicted, str(sample["answer"])))


_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<answer>.*)", re.DOTALL)
_TAGS = ("<think>", "</think>")


def format_reward(prompt, completion: str, sample: dict) -> float:
    """R1's format reward: 1.0 when the completion is `<think>reasoning</think>` then the answer, else 0.0.
    Exactly one think block, at the start (leading whitespace allowed), with non-blank reasoning; a non-blank
    answer after it with no further think tag; an answer that opens `<answer>` must end with `</answer>`."""
    match = _FORMAT.fullmatch(completion)
    if not match:
        return 0.0
    think, answer = match["think"], match["answer"].strip()
    if not think.strip() or not answer or any(tag in think or tag in answer for tag in _TAGS):
        return 0.0
    if answer.startswith("<answer>") and not (answer.endswith("</answer>") and answer.count("<answer>") == 1):
        return 0.0
    return 1.0


LANGUAGE_SCRIPTS = {
    "en": {"LATIN"}, "fr": {"LATIN"}, "de": {"LATIN"}, "es": {"LATIN"}, "it": {"LATIN"}, "pt": {"LATIN"},
    "zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"}, "ru": {"CYRILLIC"},
    "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "he": {"HEBREW"}, "el": {"GREEK"}, "hi": {"DEVANAGARI"}, "th": {"THAI"},
}
"""Language code -> the Unicode scripts of its words (the first word of a letter's Unicode name)."""
_ONE_CHAR_WORDS = {"CJK", "HIRAGANA", "KATAKANA", "THAI"}  # scripts written without spaces: each character a word


def _script(ch: str) -> str:
    """The Unicode script of a letter, as the first word of its name: LATIN, CJK, CYRILLIC, HANGUL, …"""
    name = unicodedata.name(ch, "")
    return name.split(" ")[0] if name else "UNKNOWN"


def words_by_script(text: str) -> list[str]:
    """The script of each word of text. A word is a maximal run of letters (Unicode category L*) of one script;
    in scripts written without spaces (CJK ideographs, kana, Thai) each letter is a word. Digits, punctuation and
    math symbols are not words."""
    scripts, previous = [], None
    for ch in text:
        if not unicodedata.category(ch).startswith("L"):
            previous = None
            continue
        script = _script(ch)
        if script != previous or script in _ONE_CHAR_WORDS:
            scripts.append(script)
        previous = script
    return scripts


def language_consistency(prompt, completion: str, sample: dict) -> float:
    """R1's language-consistency reward (§2.3.2): the share of the reasoning's words written in the target
    language, sample.get("language", "en") (a key of LANGUAGE_SCRIPTS). "A word of the target language" is a word
    (`words_by_script`) in one of that language's Unicode scripts, so English and French are not told apart;
    Japanese counts kanji and kana. The reasoning is the text inside <think>…</think>, or the whole completion
    without one; a reasoning without any word scores 0.0."""
    language = sample.get("language", "en")
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"language {language!r} is not one of {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    match = re.search(r"<think>(.*?)(?:</think>|$)", completion, re.DOTALL)
    scripts = words_by_script(match.group(1) if match else completion)
    if not scripts:
        return 0.0
    return sum(s in LANGUAGE_SCRIPTS[language] for s in scripts) / len(scripts)


BUILTINS = {"accuracy": accuracy, "format": format_reward, "language_consistency": language_consistency}
"""Short names accepted in `fn` for the built-in rewards."""


# ------------------------------------------------------------------------------------------------ loading

def _resolve(spec, where: str) -> Callable:
    """'module:function' (or a BUILTINS name) -> the callable, with one-line ConfigErrors."""
    if isinstance(spec, str) and spec in BUILTINS:
        return BUILTINS[spec]
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{where}.fn {spec!r} must be 'module:function' (or a built-in: {', '.join(BUILTINS)})")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}.fn {spec!r}: cannot import module {module_name!r} ({e}); "
                          f"install it or put its folder on PYTHONPATH") from None
    except Exception as e:
        raise ConfigError(f"{where}.fn {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    if not hasattr(module, function_name):
        raise ConfigError(f"{where}.fn {spec!r}: module {module_name!r} has no attribute {function_name!r}")
    fn = getattr(module, function_name)
    if not callable(fn):
        raise ConfigError(f"{where}.fn {spec!r} is a {type(fn).__name__}, not a function "
                          f"fn(prompt, completion, sample) -> float")
    return fn


def load_rewards(entries) -> list[Reward]:
    """`rl.rewards` (a list of {fn, weight = 1.0, name = the function's name}) -> [Reward], importing each fn."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError("rl.rewards must be a non-empty list of {fn: 'module:function', weight: w}")
    rewards = []
    for i, entry in enumerate(entries):
        where = f"rl.rewards[{i}]"
        if not isinstance(entry, dict) or "fn" not in entry:
            raise ConfigError(f"{where} must be a mapping with an 'fn' key ({{fn: 'module:function', weight: w}}), "
                              f"got {entry!r}")
        unknown = set(entry) - {"fn", "weight", "name"}
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; the keys are fn, weight, name")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight must be a finite number, got {weight!r}")
        fn = _resolve(entry["fn"], where)
        name = str(entry.get("name") or getattr(fn, "__name__", f"reward{i}"))
        if any(r.name == name for r in rewards):
            raise ConfigError(f"{where}: a second reward named {name!r}; give one of them a distinct 'name'")
        rewards.append(Reward(name=name, fn=fn, weight=float(weight), spec=str(entry["fn"])))
    return rewards


def _describe(sample: dict, index: int | None) -> str:
    """A short, one-line description of a sample for error messages."""
    text = " ".join(repr(sample)[:80].split())
    return f"sample {index} {text}" if index is not None else f"sample {text}"


def score(rewards: list[Reward], prompt, completion: str, sample: dict,
          index: int | None = None) -> tuple[float, dict[str, float]]:
    """Σ weight · fn(prompt, completion, sample) over the loaded rewards -> (total, {name: unweighted value}).
    A reward that raises, or returns anything but a finite real number, is a one-line RewardError naming its fn
    and the sample (`index`: the sample's position in the rollout, for the message)."""
    values = {}
    for reward in rewards:
        try:
            value = reward.fn(prompt, completion, sample)
        except Exception as e:
            message = " ".join(str(e).split())
            raise RewardError(f"reward {reward.spec!r} raised {type(e).__name__}: {message} "
                              f"on {_describe(sample, index)}") from None
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {reward.spec!r} returned {value!r} ({type(value).__name__}), expected a "
                              f"finite float, on {_describe(sample, index)}")
        values[reward.name] = float(value)
    return sum(r.weight * values[r.name] for r in rewards), values


def score_batch(rewards: list[Reward], prompts: list, completions: list[str],
                samples: list[dict]) -> tuple[list[float], dict[str, float]]:
    """`score` over a rollout -> (total per output, {"rl/reward/<name>": mean unweighted value})."""
    totals, per_reward = [], {r.name: 0.0 for r in rewards}
    for i, (prompt, completion, sample) in enumerate(zip(prompts, completions, samples, strict=True)):
        total, values = score(rewards, prompt, completion, sample, index=i)
        totals.append(total)
        for name, value in values.items():
            per_reward[name] += value
    count = max(len(totals), 1)
    return totals, {f"rl/reward/{name}": value / count for name, value in per_reward.items()}
