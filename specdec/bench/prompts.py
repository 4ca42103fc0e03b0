"""Benchmark prompts: Spec-Bench / MT-Bench JSON-lines files, checked line by line.

One JSON object a line: ``question_id`` (int or str), ``category`` (str), and either ``turns`` (a list of user
turns, chat prompts) or ``prompt`` (raw completion text, never put through a chat template). Blank lines are
skipped. A malformed line raises :class:`~specdec.errors.PromptError` naming ``file:line`` and the fix.

>>> rows = [{"question_id": 1, "category": "math", "turns": ["2+2?", "And 3+3?"]}]
>>> [p.text for p in expand(rows, all_turns=True)]
['2+2?', 'And 3+3?']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specdec.errors import PromptError

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mt_bench.jsonl"
FORMAT = ('one JSON object a line: {"question_id": 1, "category": "writing", "turns": ["user turn", ...]} '
          'or {"question_id": 1, "category": "code", "prompt": "raw completion text"}')

# used when the default prompt file is absent, so the bench still runs out of the box
BUILTIN_ROWS = [
    {"question_id": "builtin-1", "category": "writing",
     "turns": ["Write a short note inviting my team to a Friday lunch. Mention the time, the place and the menu."]},
    {"question_id": "builtin-2", "category": "coding",
     "turns": ["Write a Python function that returns the n-th Fibonacci number, then explain how it works."]},
    {"question_id": "builtin-3", "category": "math",
     "turns": ["A train travels 120 km in 1.5 hours. What is its average speed? Show each step."]},
    {"question_id": "builtin-4", "category": "extraction",
     "turns": ["List the names and ages in this text as 'name: age' lines. Text: Anna is 31, her brother Tom is "
               "27, and their friend Lea, who is 35, lives next door with Max, aged 40."]},
    {"question_id": "builtin-5", "category": "reasoning",
     "turns": ["If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain briefly."]},
]


@dataclass(frozen=True)
class Prompt:
    """One benchmark request: a user turn (``raw=False``) or raw completion text (``raw=True``)."""

    question_id: int | str
    category: str
    text: str
    raw: bool = False
    turn: int = 0  # index of the turn inside its row (0 unless bench.all_turns)


def _check_row(row, where: str) -> dict:
    """One parsed line checked against the format; returns it with defaults filled in."""
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}. Use {FORMAT}.")
    if ("turns" in row) == ("prompt" in row):
        what = "has both" if "turns" in row else "has neither"
        raise PromptError(f"{where}: the row {what} 'turns' and 'prompt'; give exactly one. Use {FORMAT}.")
    if "turns" in row:
        turns = row["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)):
            raise PromptError(f"{where}: 'turns' must be a non-empty list of non-empty strings. Use {FORMAT}.")
    elif not (isinstance(row["prompt"], str) and row["prompt"].strip()):
        raise PromptError(f"{where}: 'prompt' must be a non-empty string. Use {FORMAT}.")
    qid = row.get("question_id", where)
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise PromptError(f"{where}: 'question_id' must be an int or a string. Use {FORMAT}.")
    category = row.get("category", "uncategorized")
    if not isinstance(category, str) or not category:
        raise PromptError(f"{where}: 'category' must be a non-empty string. Use {FORMAT}.")
    return {**row, "question_id": qid, "category": category}


def read_rows(path: str | Path) -> list[dict]:
    """The checked rows of a prompt file; a missing file or bad line raises :class:`PromptError`."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} not found; set bench.prompts=<path to a .jsonl file> "
                          f"({FORMAT}).")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: not valid JSON ({e.msg} at column {e.colno}). Use {FORMAT}.") from None
            rows.append(_check_row(row, where))
    if not rows:
        raise PromptError(f"prompt file {str(path)!r} has no prompts; use {FORMAT}.")
    return rows


def expand(rows: Sequence[dict], all_turns: bool = False) -> list[Prompt]:
    """Rows as prompts: the first turn of each row, or (``all_turns``) every turn as a separate single-turn prompt.

    With ``all_turns`` a later turn is benchmarked on its own, without the earlier turns and answers: the simplest
    honest reading that keeps every request independent and identical across methods.
    """
    out = []
    for row in rows:
        if "prompt" in row:
            out.append(Prompt(row["question_id"], row["category"], row["prompt"], raw=True))
            continue
        turns = row["turns"] if all_turns else row["turns"][:1]
        out.extend(Prompt(row["question_id"], row["category"], t, turn=i) for i, t in enumerate(turns))
    return out


def select(prompts: Sequence[Prompt], categories: Sequence[str] | None, limit: int | None) -> list[Prompt]:
    """Prompts of the given categories (None = all), at most ``limit`` of them (None = all).

    A limit takes the prompts round-robin over the categories (in file order), so a short run (``bench=demo``)
    still covers every category instead of only the file's first one.
    """
    out = list(prompts)
    if categories is not None:
        known = sorted({p.category for p in prompts})
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise PromptError(f"no prompts in categories {unknown}; the file's categories are {known} "
                              "(set bench.categories to some of them, or null for all).")
        out = [p for p in out if p.category in set(categories)]
    if limit is None or limit >= len(out):
        return out
    by_category: dict[str, list[Prompt]] = {}
    for p in out:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    picked = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)][:limit]
    return sorted(picked, key=out.index)  # file order, as without a limit


def load_prompts(path: str | Path | None = None, categories: Sequence[str] | None = None, limit: int | None = None,
                 all_turns: bool = False) -> tuple[list[Prompt], str]:
    """``(prompts, source)`` for the bench; ``path=None`` reads the default file, or the built-in prompts when it
    is absent (``source`` then says so)."""
    if path is None and not DEFAULT_PROMPTS.is_file():
        rows, source = BUILTIN_ROWS, "built-in"
    else:
        src = Path(path) if path is not None else DEFAULT_PROMPTS.resolve()
        rows, source = read_rows(src), str(src)
    return select(expand(rows, all_turns), categories, limit), source
