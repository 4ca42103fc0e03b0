"""Token recycling's adjacency table: for each token, the target's most likely next tokens the last time a verify step
scored it, shared by every request and optionally kept in a file across restarts.

A verify step computes the target's distribution after every node of its tree, accepted or not; the table keeps each
node token's top-k of it (``rows [V, k]``, int32, most likely first, -1 where a token was never scored), as Token
Recycling (arXiv 2408.08696) does. Later trees are grown from it (:class:`drafters.recycling.RecyclingDrafter`).
A row is what the target predicted in one context, the latest: an approximation that serves the contexts where the
token recurs (code, templates, repeated phrasing). Memory is fixed: ``4 k`` bytes per vocabulary entry (1.5 MiB for
the default target's 49152 tokens at k = 8).

Rows are written whole under one lock, so requests updating it from threads or a batch never mix two rows. The
file (``save``/``load``, :mod:`drafters.traffic_file`): the rows and a header with the format version, k and the
tokenizer's fingerprint.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from drafters import traffic_file
from specdec.errors import ConfigError

FORMAT, FORMAT_VERSION = "specdec-recycling-table", 1


class SuccessorTable:
    """Rows ``[V, k]`` of next-token candidates per token (V grows to the largest token seen when not given)."""

    def __init__(self, k: int = 8, vocab_size: int | None = None, fingerprint: str = "") -> None:
        if k < 1:
            raise ConfigError(f"the recycling table keeps k >= 1 successors per token; got k={k}.")
        self.k, self.fingerprint = k, fingerprint
        self.rows = np.full((vocab_size or 1024, k), -1, dtype=np.int32)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Tokens with a row (scored at least once)."""
        return int((self.rows[:, 0] >= 0).sum())

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def _grow(self, largest: int) -> None:
        if largest >= self.rows.shape[0]:
            more = np.full((max(largest + 1, 2 * self.rows.shape[0]) - self.rows.shape[0], self.k), -1, np.int32)
            self.rows = np.concatenate([self.rows, more])

    def update(self, tokens: np.ndarray, topk: np.ndarray) -> None:
        """``tokens [n]`` were scored and the target's most likely next tokens after them are ``topk [n, >= 1]``
        (most likely first; wider than k: cut, narrower: the rest -1). A token twice in one update keeps its last."""
        tokens = np.asarray(tokens, dtype=np.int64)
        topk = np.asarray(topk, dtype=np.int32)[:, :self.k]
        if tokens.size == 0:
            return
        if topk.shape[1] < self.k:
            topk = np.concatenate([topk, np.full((topk.shape[0], self.k - topk.shape[1]), -1, np.int32)], 1)
        with self._lock:
            self._grow(int(tokens.max()))
            self.rows[tokens] = topk

    def successors(self, token: int) -> list[int]:
        """The candidates after ``token``, most likely first ([] for a token never scored)."""
        if token >= self.rows.shape[0]:
            return []
        row = self.rows[token]
        return row[row >= 0].tolist()

    def save(self, path: str | Path) -> Path:
        """Write the table to ``path`` (``.npz``, no pickle), atomically."""
        with self._lock:
            rows = self.rows.copy()
        return traffic_file.write(path, FORMAT, FORMAT_VERSION, self.fingerprint, {"rows": rows}, k=self.k)

    def load(self, path: str | Path) -> int:
        """Fill the table from a file :meth:`save` wrote (its rows replace this table's where they are set);
        returns the tokens read. A file that does not parse, of another version, k or tokenizer is refused with a
        :class:`ConfigError`, the table unchanged."""
        header, arrays = traffic_file.read(path, FORMAT, "recycling table", FORMAT_VERSION, self.fingerprint,
                                           ("rows",))
        rows = arrays["rows"]
        if header.get("k") != self.k or rows.ndim != 2 or rows.shape[1] != self.k or rows.dtype != np.int32:
            raise traffic_file.corrupt(path, "recycling table",
                                       f"rows {rows.dtype} {tuple(rows.shape)}, header k={header.get('k')}; this "
                                       f"table keeps k={self.k} (int32): a table of another k needs its own file")
        if rows.size and (rows.min() < -1):
            raise traffic_file.corrupt(path, "recycling table", "negative token ids")
        scored = np.nonzero(rows[:, 0] >= 0)[0]
        with self._lock:
            self._grow(rows.shape[0] - 1)
            self.rows[scored] = rows[scored]
        return int(scored.size)


_SHARED: dict[tuple, SuccessorTable] = {}
_SHARED_LOCK = threading.Lock()


def shared_table(name: str, fingerprint: str, k: int, vocab_size: int | None,
                 table_file: str | None = None) -> SuccessorTable:
    """The process's table called ``name`` for this tokenizer and k (made, and filled from ``table_file`` if it
    exists, on first use): every drafter built with the same name shares it, as a decoder's or server's requests do."""
    key = (name, fingerprint, k, str(Path(table_file).resolve()) if table_file else None)
    with _SHARED_LOCK:
        table = _SHARED.get(key)
        if table is None:
            table = SuccessorTable(k, vocab_size, fingerprint)
            if table_file and Path(table_file).exists():
                table.load(table_file)
            _SHARED[key] = table
        return table
