"""Synthetic skills with exact answers, each a ``(prompt, answer)`` generator driven by a seeded RNG.

Items that a tiny model must handle one symbol at a time (letters, digits, brackets) are
separated by spaces, so that every item is its own token.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

Example = tuple[str, str]
LETTERS = string.ascii_lowercase
BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def addition(rng: random.Random, min_digits: int = 1, max_digits: int = 3) -> Example:
    a, b = _number(rng, min_digits, max_digits), _number(rng, min_digits, max_digits)
    return f"What is {a} + {b}?", str(a + b)


def subtraction(rng: random.Random) -> Example:
    a, b = sorted((_number(rng, 1, 3), _number(rng, 1, 3)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def multiplication(rng: random.Random) -> Example:
    a, b = _number(rng, 1, 3), rng.randint(0, 9)
    return f"What is {a} * {b}?", str(a * b)


def copy(rng: random.Random) -> Example:
    items = " ".join(rng.choices(LETTERS, k=rng.randint(4, 12)))
    return f"Copy: {items}", items


def reverse(rng: random.Random) -> Example:
    items = rng.choices(LETTERS, k=rng.randint(4, 10))
    return f"Reverse: {' '.join(items)}", " ".join(reversed(items))


def sort(rng: random.Random) -> Example:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]
    return f"Sort: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _balanced(rng: random.Random, pairs: int) -> list[str]:
    if pairs == 0:
        return []
    inner = rng.randint(0, pairs - 1)
    opening = rng.choice(list(BRACKETS))
    return [opening, *_balanced(rng, inner), BRACKETS[opening], *_balanced(rng, pairs - 1 - inner)]


def _is_balanced(items: list[str]) -> bool:
    stack: list[str] = []
    for item in items:
        if item in BRACKETS:
            stack.append(BRACKETS[item])
        elif not stack or stack.pop() != item:
            return False
    return not stack


def brackets(rng: random.Random) -> Example:
    items = _balanced(rng, rng.randint(1, 6))
    if rng.random() < 0.5:  # corrupt: swap a symbol for another bracket
        position = rng.randrange(len(items))
        items[position] = rng.choice([b for b in "()[]{}" if b != items[position]])
    return f"Balanced? {' '.join(items)}", "yes" if _is_balanced(items) else "no"


def recall(rng: random.Random) -> Example:
    keys = rng.sample(LETTERS, rng.randint(3, 6))
    values = {key: rng.randint(0, 9) for key in keys}
    query = rng.choice(keys)
    context = " ".join(f"{k}={v}" for k, v in values.items())
    return f"{context}. Value of {query}?", str(values[query])


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "addition": addition,
    "subtraction": subtraction,
    "multiplication": multiplication,
    "copy": copy,
    "reverse": reverse,
    "sort": sort,
    "brackets": brackets,
    "recall": recall,
}


def addition_2_3_digits(rng: random.Random) -> Example:
    """The held-out addition set: both operands have 2 or 3 digits."""
    return addition(rng, min_digits=2, max_digits=3)


EVAL_GENERATORS: dict[str, Callable[[random.Random], Example]] = {**SKILLS, "addition": addition_2_3_digits}
