"""The quality check (specdec.bench.quality): held-out text only, perplexity and top-1 agreement computed right."""

from __future__ import annotations

import json
import math

import torch

from specdec.bench import quality
from specdec.splits import is_validation
from tests.tiny import tiny_llama, tiny_tokenizer


def _rows(n: int, held_out: bool) -> list[dict]:
    rows, i = [], 0
    while len(rows) < n:
        if is_validation(f"r{i}") == held_out:
            words = " ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40))
            rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": words},
                                                      {"role": "assistant", "content": words}]})
        i += 1
    return rows


def test_heldout_texts_take_the_validation_split_only(tmp_path):
    path = tmp_path / "sharegpt_chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(5, False) + _rows(2, True)))
    texts = quality.heldout_texts(tiny_tokenizer(), n=10, data=tmp_path)
    assert len(texts) == 2 and all(t.shape[1] == 80 for t in texts)  # the held-out rows, as plain text (no template)


def test_scores_against_the_reference():
    model = tiny_llama(0, dtype=torch.float32)
    texts = [torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = [quality.next_token_logits(model, t).argmax(-1) for t in texts]
    q = quality.score(model, texts, reference, "float32")
    assert q.top1_agreement == 1.0 and q.tokens == 38
    logits = torch.cat([quality.next_token_logits(model, t) for t in texts])
    targets = torch.cat([t[0, 1:] for t in texts])
    assert math.isclose(q.perplexity, math.exp(float(torch.nn.functional.cross_entropy(logits, targets))), rel_tol=1e-5)
    flipped = [r.roll(1) for r in reference]
    assert quality.score(model, texts, flipped, "x").top1_agreement < 0.5
