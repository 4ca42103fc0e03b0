"""Prompt files: the Spec-Bench format, turn expansion, filters, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest

from specdec.bench import prompts
from specdec.bench.prompts import Prompt, expand, load_prompts, read_rows, select
from specdec.errors import PromptError

ROWS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
    {"question_id": "c2", "category": "code", "prompt": "def fib(n):"},
    {"question_id": 3, "category": "math", "turns": ["2+2?"]},
]


def write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_turns_and_prompt_rows(tmp_path):
    path = write(tmp_path, [json.dumps(r) for r in ROWS[:2]] + ["", json.dumps(ROWS[2])])  # blank line skipped
    got, source = load_prompts(path)
    assert source == str(path)
    assert got == [Prompt(1, "writing", "Write a poem."), Prompt("c2", "code", "def fib(n):", raw=True),
                   Prompt(3, "math", "2+2?")]


def test_all_turns_makes_each_turn_a_separate_prompt():
    got = expand(ROWS, all_turns=True)
    assert [(p.question_id, p.turn, p.text) for p in got] == [
        (1, 0, "Write a poem."), (1, 1, "Now shorter."), ("c2", 0, "def fib(n):"), (3, 0, "2+2?")]


def test_limit_takes_prompts_round_robin_over_categories():
    ps = [Prompt(f"{c}{i}", c, "x") for c in ("writing", "math", "code") for i in range(3)]
    assert [p.question_id for p in select(ps, None, 4)] == ["writing0", "writing1", "math0", "code0"]
    assert [p.question_id for p in select(ps, ["math", "code"], 3)] == ["math0", "math1", "code0"]


def test_categories_then_limit():
    ps = expand(ROWS)
    assert [p.question_id for p in select(ps, ["math", "writing"], None)] == [1, 3]
    assert [p.question_id for p in select(ps, None, 2)] == [1, "c2"]
    assert [p.question_id for p in select(ps, ["writing", "math"], 1)] == [1]


def test_unknown_category_names_the_known_ones():
    with pytest.raises(PromptError, match=r"no prompts in categories \['poetry'\].*\['code', 'math', 'writing'\]"):
        select(expand(ROWS), ["poetry"], None)


def test_missing_category_and_id_get_defaults(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "hello"})])
    (row,) = read_rows(path)
    assert row["category"] == "uncategorized" and row["question_id"] == f"{path}:1"


@pytest.mark.parametrize("line, problem", [
    ('{"question_id": 1, "turns": ["a"]', "not valid JSON"),
    ('{"question_id": 1, "category": "x"}', "neither 'turns' and 'prompt'"),
    ('{"question_id": 1, "turns": ["a"], "prompt": "b"}', "both 'turns' and 'prompt'"),
    ('{"question_id": 1, "turns": "a single string"}', "'turns' must be a non-empty list"),
    ('{"question_id": 1, "turns": []}', "'turns' must be a non-empty list"),
    ('{"question_id": 1, "turns": ["ok", 3]}', "'turns' must be a non-empty list"),
    ('{"question_id": 1, "prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"question_id": [1], "prompt": "a"}', "'question_id' must be an int or a string"),
    ('{"question_id": 1, "category": 5, "prompt": "a"}', "'category' must be a non-empty string"),
    ('["a list"]', "expected a JSON object"),
])
def test_malformed_line_names_file_line_and_format(tmp_path, line, problem):
    path = write(tmp_path, [json.dumps(ROWS[0]), line])
    with pytest.raises(PromptError) as e:
        read_rows(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and problem in msg and '"turns": ["user turn", ...]' in msg


def test_missing_file_names_path_and_option(tmp_path):
    with pytest.raises(PromptError, match=r"nope\.jsonl.*not found; set bench\.prompts="):
        load_prompts(tmp_path / "nope.jsonl")


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(PromptError, match="has no prompts"):
        read_rows(write(tmp_path, [""]))


def test_default_file_falls_back_to_builtin_prompts(monkeypatch, tmp_path):
    monkeypatch.setattr(prompts, "DEFAULT_PROMPTS", tmp_path / "absent.jsonl")
    got, source = load_prompts(None, limit=3)
    assert source == "built-in" and len(got) == 3 and all(not p.raw and p.text for p in got)


def test_default_file_is_used_when_present(monkeypatch, tmp_path):
    path = write(tmp_path, [json.dumps(ROWS[2])])
    monkeypatch.setattr(prompts, "DEFAULT_PROMPTS", path)
    got, source = load_prompts(None)
    assert source == str(path.resolve()) and got == [Prompt(3, "math", "2+2?")]


def test_builtin_rows_pass_the_format_check():
    for i, row in enumerate(prompts.BUILTIN_ROWS):
        prompts._check_row(row, f"builtin:{i}")
