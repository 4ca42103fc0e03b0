"""Self-distillation data: the target's own answers to prompts, generated in batches and cached to disk.

Drafters accept more when trained on what the target itself writes. :func:`generate_answers` appends one JSON line
per answered prompt to a cache file as it goes, so an interrupted run resumes where it stopped (answered ids are
skipped). Each line keeps the exact token ids (``input_ids``, ``n_prompt``) so no re-tokenization changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdec.kernels import cpu_gemm
from train.data import encode_prompt_ids


def answered_ids(path: Path) -> set[str]:
    """Ids already in a cache file (a torn last line from a crash is ignored and regenerated)."""
    done = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left unfinished, so appended rows start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_answers(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[dict], out_path: str | Path, *, batch_size: int = 16,
                     max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                     seed: int = 0, max_prompt_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """Answer each prompt row (``{"id", "messages": [user]}``) with the target; returns all cached rows.

    Greedy by default (``do_sample=True`` samples at ``temperature``). Prompts are batched by length with left
    padding; each batch is written before the next starts. Prompts longer than ``max_prompt_tokens`` are skipped.
    A float32 target on CPU generates with specdec's linear kernel (:func:`specdec.kernels.cpu_gemm.fast_linears`); a
    target on a GPU generates there (raise ``batch_size`` to use it: hundreds of prompts a batch fit a small target).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(out_path)
    done = answered_ids(out_path)
    todo = [p for p in prompts if p["id"] not in done]
    encoded = [(p, encode_prompt_ids(tokenizer, p["messages"])) for p in todo]
    if max_prompt_tokens is not None:  # an answer after a longer prompt would be cut from the features anyway
        encoded = [e for e in encoded if len(e[1]) <= max_prompt_tokens]
    encoded.sort(key=lambda e: len(e[1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    bar = tqdm(total=len(encoded), desc="self-distill answers", disable=not progress, unit="prompt")
    with out_path.open("a", encoding="utf-8") as f, cpu_gemm.fast_linears(model, enabled=cpu_gemm.wanted(model)):
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for _, ids in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for _, x in batch], device=model.device)
            attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x in batch], device=model.device)
            if do_sample:
                torch.manual_seed(seed + start)
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature if do_sample else None,
                                 top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos)
            for (p, prompt_ids), row in zip(batch, out[:, width:].tolist()):
                answer = _until_eos(row, eos)
                text = tokenizer.decode(answer, skip_special_tokens=True)
                f.write(json.dumps({"id": p["id"], "source": p.get("source", ""),
                                    "messages": p["messages"] + [{"role": "assistant", "content": text}],
                                    "input_ids": prompt_ids + answer, "n_prompt": len(prompt_ids)}) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return read_answers(out_path)


def _until_eos(row: list[int], eos) -> list[int]:
    """Cut a generated row after its first EOS (kept), dropping the padding after it."""
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row
