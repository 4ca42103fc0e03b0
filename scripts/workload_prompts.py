"""Write the prompt sets where what the engine has already seen predicts what comes next: code edits (the answer
copies much of the input) and agentic sessions (related requests one after another: tool calls in JSON, SQL over one
schema, one report template over different records), in Spec-Bench format (``question_id``, ``category``, ``turns``).

    python scripts/workload_prompts.py --out bench_results/workloads.jsonl [--per-category 8]
    python -m specdec.bench bench.prompts=bench_results/workloads.jsonl ...

Material: functions from this Python's standard library sources (Python Software Foundation License; the prompts
quote them, nothing is copied into the repository) and records made here from a seeded generator (ours). The file is
written on the machine that runs the script.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import sys
from pathlib import Path

CODE_MODULES = ("textwrap", "shlex", "fnmatch", "calendar", "colorsys", "bisect", "heapq", "difflib", "statistics",
                "string", "glob", "csv")
CODE_TASKS = (
    "Add type hints and a one-line docstring to this Python function. Reply with the whole function only.",
    "Rewrite this Python function so that it raises ValueError with a clear message on invalid arguments. Reply "
    "with the whole function only.",
    "Rename the function to `{new}` and keep everything else as it is. Reply with the whole function only.",
    "Add a comment above each block of this Python function explaining what it does. Reply with the whole function "
    "only.",
)

TOOLS = [
    {"name": "get_weather", "parameters": {"city": "string", "unit": "celsius|fahrenheit"}},
    {"name": "create_event", "parameters": {"title": "string", "date": "YYYY-MM-DD", "attendees": "list of emails"}},
    {"name": "search_orders", "parameters": {"customer_id": "integer", "status": "open|shipped|cancelled"}},
    {"name": "send_email", "parameters": {"to": "email", "subject": "string", "body": "string"}},
]
SCHEMA = """CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, joined DATE);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), total REAL,
                     status TEXT, created DATE);
CREATE TABLE items (order_id INTEGER REFERENCES orders(id), product TEXT, quantity INTEGER, price REAL);"""
SQL_QUESTIONS = (
    "the names of customers from {city} who joined after {date}",
    "the total of all shipped orders per customer, largest first",
    "the number of orders created on {date} with a total above {amount}",
    "the products ordered by the customer with id {cid}, with their quantities",
    "the average order total per city",
    "customers who have no cancelled orders and at least {n} orders",
    "the ten most expensive items sold in {city}",
    "the orders of customer {cid} that are still open, newest first",
)
TEMPLATE = """Customer report
Name: <name>
City: <city>
Customer since: <date>
Open orders: <number>
Summary: <one sentence about the customer>"""
NAMES = ("Ada Byron", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth",
         "Frances Allen", "John Backus", "Margaret Hamilton", "Ken Thompson", "Radia Perlman", "Niklaus Wirth")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Tallinn", "Porto", "Quebec", "Hobart", "Graz")


def functions(rng: random.Random, n: int) -> list[str]:
    """Sources of ``n`` standard-library functions of 6 to 30 lines, picked with ``rng``."""
    found = []
    for name in CODE_MODULES:
        module = __import__(name)
        tree = ast.parse(inspect.getsource(module))
        lines = inspect.getsource(module).splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and 6 <= node.end_lineno - node.lineno + 1 <= 30:
                found.append("\n".join(lines[node.lineno - 1:node.end_lineno]))
    rng.shuffle(found)
    return found[:n]


def code_edits(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i, src in enumerate(functions(rng, n)):
        task = CODE_TASKS[i % len(CODE_TASKS)].format(new=f"helper_{i}")
        out.append({"category": "code_edit", "turns": [f"{task}\n\n```python\n{src}\n```"]})
    return out


def tool_calls(rng: random.Random, n: int) -> list[dict]:
    system = ("You can call these tools. Answer every request with exactly one JSON object "
              '{"tool": <name>, "arguments": {...}} and nothing else.\nTools: ' + json.dumps(TOOLS))
    asks = ("What's the weather in {city} in celsius?", "Book a meeting called '{title}' on {date} with {email}.",
            "Show me the open orders of customer {cid}.", "Email {email} that order {cid} has shipped.",
            "Is it warm in {city} today? Use fahrenheit.", "Find the cancelled orders for customer number {cid}.")
    out = []
    for i in range(n):
        ask = asks[i % len(asks)].format(city=rng.choice(CITIES), title=f"review {rng.randint(1, 99)}",
                                         date=f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                                         email=f"{rng.choice(NAMES).split()[0].lower()}@example.com",
                                         cid=rng.randint(100, 999))
        out.append({"category": "tool_json", "turns": [f"{system}\n\nRequest: {ask}"]})
    return out


def sql(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        q = SQL_QUESTIONS[i % len(SQL_QUESTIONS)].format(
            city=rng.choice(CITIES), date=f"2025-{rng.randint(1, 12):02d}-01", amount=rng.randint(50, 500),
            cid=rng.randint(1, 300), n=rng.randint(2, 5))
        out.append({"category": "sql", "turns": [f"Database schema:\n{SCHEMA}\n\nWrite one SQLite query that "
                                                 f"returns {q}. Reply with the query only."]})
    return out


def reports(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        record = {"name": rng.choice(NAMES), "city": rng.choice(CITIES),
                  "joined": f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                  "open_orders": rng.randint(0, 9), "last_order_total": round(rng.uniform(5, 900), 2)}
        out.append({"category": "report", "turns": [f"Fill in this template for the record below. Keep the template's "
                                                    f"lines exactly and replace each <...>.\n\n{TEMPLATE}\n\n"
                                                    f"Record: {json.dumps(record)}"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results/workloads.jsonl")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for make in (code_edits, tool_calls, sql, reports):
        rows += make(rng, args.per_category)
    for i, row in enumerate(rows):
        row["question_id"] = f"{row['category']}-{i}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts ({args.per_category} per category) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
