"""Verifiable rewards: programs that score a completion, so that RL needs no reward model.

- `task`: the task's own scorer (reasoning-gym's `score_answer`) on the answer the completion gives:
  the text of its last <answer>...</answer>; else with rl.answer=last_number the last number it
  writes; else the whole completion stripped.
- `format`: 1 when the completion gives its answer in exactly one <answer>...</answer>, else 0.
- `module:function`: the user's own, called as function(prompt=..., completion=..., row=...) and
  returning a number (a module under the project, or any importable one).

rl.rewards weighs them ({name: weight}); the reward of a completion is the weighted sum. A function
that raises or returns something that is not a finite number stops the step before it is taken,
naming the function and the row.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from lmtune.rl import RLError

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
Reward = Callable[..., float]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_of(completion: str, kind: str = "tags") -> str:
    """The answer a completion gives: its last <answer>...</answer>; else, for kind=last_number, the
    last number it writes (how numeric answers are read from free text, as GSM8K's are), else all
    of it; stripped."""
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip()
    numbers = _NUMBER.findall(completion) if kind == "last_number" else []
    return numbers[-1] if numbers else completion.strip()


def format_reward(prompt: str, completion: str, row: dict) -> float:
    return 1.0 if len(_ANSWER.findall(completion)) == 1 else 0.0


def brevity(prompt: str, completion: str, row: dict) -> float:
    """Shorter completions score higher (1 for an empty one, 0.5 at 100 characters): a shaping
    reward against rambling, and the example of a reward of your own: rl.rewards takes it as
    `lmtune.rl.rewards:brevity`, as it takes `mypackage.rewards:myfunction`."""
    return 1.0 / (1.0 + len(completion.strip()) / 100)


def task_reward(task, answer: str = "tags") -> Reward:
    """The task's own scorer on the completion's answer (1.0 right, 0.0 wrong, partial credit
    where the task gives it); `answer`: how the answer is read (answer_of)."""

    def score(prompt: str, completion: str, row: dict) -> float:
        return float(task.score_answer(answer_of(completion, answer), row["entry"]))

    return score


def user_reward(spec: str) -> Reward:
    """`package.module:function`, imported; refused by name when it cannot be."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise RLError(f"rl.rewards: '{spec}' is neither task, format nor module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RLError(f"rl.rewards: {spec}: cannot import {module_name} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RLError(f"rl.rewards: {spec}: {module_name} has no function {function_name}")
    return function


def reward_functions(
    weights: dict[str, float], task, answer: str = "tags"
) -> dict[str, tuple[Reward, float]]:
    """name → (function, weight) for rl.rewards; every one resolved before any model loads."""
    known = {"task": lambda: task_reward(task, answer), "format": lambda: format_reward}
    return {
        name: (known[name]() if name in known else user_reward(name), float(w)) for name, w in weights.items()
    }


def score(
    functions: dict[str, tuple[Reward, float]], prompts: list[str], completions: list[str], rows: list[dict]
) -> dict[str, list[float]]:
    """Each function's reward of each completion, and their weighted sum (`reward`)."""
    scores: dict[str, list[float]] = {name: [] for name in functions}
    for prompt, completion, row in zip(prompts, completions, rows, strict=True):
        for name, (function, _) in functions.items():
            try:
                value = function(prompt=prompt, completion=completion, row=row)
            except Exception as err:  # the user's code: any error, named with its row
                raise RLError(
                    f"reward {name} raised {type(err).__name__}: {err} on row {row['index']} "
                    f"(prompt {prompt[-80:]!r}, completion {completion[:80]!r}); fix the function"
                ) from None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RLError(
                    f"reward {name} returned {value!r} on row {row['index']} (completion {completion[:80]!r}): "
                    "a reward must be a finite number"
                )
            scores[name].append(float(value))
    scores["reward"] = [
        sum(scores[name][i] * weight for name, (_, weight) in functions.items())
        for i in range(len(completions))
    ]
    return scores
