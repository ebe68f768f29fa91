"""ZIP: entropy-law data selection by compression ratio (Yin et al. 2024, github.com/USTC-StarTeam/ZIP).

Definitions (docs/algorithms/data_selection.md §2.4):

* C(D) = |ser(D)| / |zlib₉(ser(D))|; lower = less redundant.
* ser(list) = prefix + sep.join(ser(row)) + suffix. ``ser="reference"`` renders each row as
  the Python repr of its messages and the list like a Python list (``[`` ``, `` ``]``), as
  the original compresses ``str(list_of_samples)``; ``ser="text"`` uses plain
  ``role: content`` lines joined by blank lines.
* g(x) = C([x]).

Greedy loop while |S| < B (K1/K2/K3 = 10,000/200/100):
  1. Cand = the K1 live rows with the lowest g;
  2. g(x) ← C(S ⊕ x) for x in Cand            (pure, sliced: ``map_fn`` parallelises it);
  3. T2 = the K2 lowest; tombstone all of T2;
  4. from T = ∅, K3 times add argmin_{x ∈ T2∖T} C(T ⊕ x)   (also via ``map_fn``);
  5. S ← S ⊕ T.
Exactly B rows are returned (the original overshoots by up to K3−1): step 4 stops at B,
which equals truncating S to B since T is built in pick order. Ties go to the smaller
r(id). If every unpicked row has been tombstoned before |S| = B, the tombstones are lifted.

Modes:
* ``exact``: C(S ⊕ x) recompresses all of ser(S ⊕ x): O(|S|) per candidate.
* ``window`` (ZIP-lite): deflate matches look back only 32 KiB, so
  |zlib(S ⊕ x)| ≈ c_S + Δ(x), where c_S is the sync-flushed length of a running raw-deflate
  stream of ser(S) and Δ(x) is what a level-9 compressor that already holds the last
  32 KiB of S emits for x. Each task primes one compressor with that tail (``zdict``) and
  copies it per candidate, so a candidate costs O(|x|), not O(|S|). The agreement with
  ``exact`` is an approximation (block / Huffman effects); see benchmarks/bench_zip.py.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from effsft.select.ranking import top_k_indices

__all__ = [
    "SerFormat",
    "ser_format",
    "serialize_row",
    "serialize_rows",
    "ser_list",
    "compression_ratio",
    "g_scores",
    "score_exact",
    "score_window",
    "serial_map",
    "ProcessMap",
    "ZipResult",
    "zip_select",
]

WINDOW = 32 * 1024  # deflate's look-back distance
ZLIB_OVERHEAD = 6  # 2-byte zlib header + 4-byte Adler-32 trailer around a raw deflate stream
Message = Mapping[str, str]


# ----------------------------------------------------------------------------- serialisation
@dataclass(frozen=True)
class SerFormat:
    """How a list of serialised rows is framed: prefix + sep.join(rows) + suffix."""

    prefix: bytes
    sep: bytes
    suffix: bytes


_FORMATS = {"reference": SerFormat(b"[", b", ", b"]"), "text": SerFormat(b"", b"\n\n", b"")}


def ser_format(ser: str) -> SerFormat:
    if ser not in _FORMATS:
        raise ValueError(f"ser must be one of {sorted(_FORMATS)}, got {ser!r}")
    return _FORMATS[ser]


def serialize_row(messages: Sequence[Message], ser: str = "reference") -> bytes:
    """ser(row) as UTF-8 bytes: the Python repr of the messages, or plain ``role: content`` lines."""
    ser_format(ser)
    if ser == "reference":
        return repr([{"role": m["role"], "content": m["content"]} for m in messages]).encode("utf-8")
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages).encode("utf-8")


def serialize_rows(messages_list: Sequence[Sequence[Message]], ser: str = "reference") -> list[bytes]:
    return [serialize_row(m, ser) for m in messages_list]


def ser_list(rows: Sequence[bytes], fmt: SerFormat) -> bytes:
    """ser(D) = prefix + sep.join(rows) + suffix."""
    return fmt.prefix + fmt.sep.join(rows) + fmt.suffix


def compression_ratio(data: bytes) -> float:
    """C = |data| / |zlib level 9(data)|."""
    return len(data) / len(zlib.compress(data, 9))


def g_scores(rows: Sequence[bytes], fmt: SerFormat) -> np.ndarray:
    """g(x) = C([x]) for every row (a per-row map). Returns [N] float64."""
    return np.array([compression_ratio(ser_list([r], fmt)) for r in rows], np.float64)


# ----------------------------------------------------------------------------- step-2 scorers (pure)
def score_exact(task: tuple[bytes, int, SerFormat, Sequence[bytes]]) -> np.ndarray:
    """C(S ⊕ x) for a slice of candidates, recompressing everything.

    Args:
        task: ``(body, n_rows, fmt, cands)``: body = sep.join(ser rows of S) (no prefix /
            suffix), n_rows = |S|, fmt, and the candidate rows.

    Returns:
        [len(cands)] float64.
    """
    body, n_rows, fmt, cands = task
    head = fmt.prefix + body + (fmt.sep if n_rows else b"")
    return np.array([compression_ratio(head + x + fmt.suffix) for x in cands], np.float64)


def score_window(task: tuple[bytes, int, int, SerFormat, Sequence[bytes]]) -> np.ndarray:
    """ZIP-lite C(S ⊕ x) ≈ (|ser(S)| + |sep x suffix|) / (c_S + Δ(x) + zlib overhead).

    Args:
        task: ``(tail, n_bytes, c_s, fmt, cands)``: the last 32 KiB of prefix+body of S,
            |prefix+body|, the sync-flushed raw-deflate length of prefix+body, fmt, and the
            candidate rows; |S| = 0 is signalled by ``n_bytes == len(fmt.prefix)``.

    Returns:
        [len(cands)] float64.
    """
    tail, n_bytes, c_s, fmt, cands = task
    empty = n_bytes == len(fmt.prefix)
    base = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, tail) if tail else \
        zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    out = np.empty(len(cands), np.float64)
    for j, x in enumerate(cands):
        piece = (b"" if empty else fmt.sep) + x + fmt.suffix
        c = base.copy()  # the compressor-copy trick: O(|x|) per candidate
        delta = len(c.compress(piece)) + len(c.flush(zlib.Z_FINISH))
        out[j] = (n_bytes + len(piece)) / (c_s + delta + ZLIB_OVERHEAD)
    return out


# ----------------------------------------------------------------------------- maps
def serial_map(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
    """The default ``map_fn``: run the tasks one after another."""
    return [fn(t) for t in tasks]


class ProcessMap:
    """``map_fn`` backed by a process pool (no Ray needed): ``ProcessMap(4)(fn, tasks)``.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, n_workers: int, executor: Executor | None = None):
        self.executor = executor or ProcessPoolExecutor(max_workers=n_workers)

    def __call__(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        return list(self.executor.map(fn, tasks))

    def close(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> "ProcessMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- the set being built
@dataclass
class _Stream:
    """ser(S) built incrementally: its bytes plus a running raw-deflate stream (window mode).

    ``c_len`` is the length emitted so far after a ``Z_BLOCK`` flush, which closes the
    current block without the 4–5 byte empty block a sync flush would add (≤ 7 bits stay
    pending), so c_S is not inflated by the number of flushes.
    """

    fmt: SerFormat
    n_rows: int = 0
    body: bytearray = field(default_factory=bytearray)
    _c_len: int = 0
    _dirty: bool = True
    _comp: Any = None

    def __post_init__(self):
        self._comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        self._c_len = len(self._comp.compress(self.fmt.prefix))

    def add(self, row: bytes) -> None:
        piece = (self.fmt.sep if self.n_rows else b"") + row
        self.body += piece
        self._c_len += len(self._comp.compress(piece))
        self._dirty = True
        self.n_rows += 1

    @property
    def c_len(self) -> int:
        """Raw-deflate bytes of prefix + body (flushed to a block boundary)."""
        if self._dirty:
            self._c_len += len(self._comp.flush(zlib.Z_BLOCK))
            self._dirty = False
        return self._c_len

    def task(self, mode: str, cands: Sequence[bytes]) -> tuple:
        if mode == "exact":
            return bytes(self.body), self.n_rows, self.fmt, cands
        head = (self.fmt.prefix + bytes(self.body[-WINDOW:]))[-WINDOW:]
        return head, len(self.fmt.prefix) + len(self.body), self.c_len, self.fmt, cands

    def ratio(self, mode: str) -> float:
        """C(S): exact, or the window-mode estimate from the running stream."""
        if mode == "exact":
            return compression_ratio(self.fmt.prefix + bytes(self.body) + self.fmt.suffix)
        data_len = len(self.fmt.prefix) + len(self.body) + len(self.fmt.suffix)
        return data_len / (self.c_len + len(self.fmt.suffix) + ZLIB_OVERHEAD)


# ----------------------------------------------------------------------------- the loop
@dataclass
class ZipResult:
    """Picked row indices (pick order, exactly B) and the C(S) trace after each iteration."""

    picked: np.ndarray
    trace_size: list[int]
    trace_ratio: list[float]


def _score(stream: _Stream, mode: str, rows: Sequence[bytes], idx: np.ndarray, map_fn, slice_size: int) -> np.ndarray:
    """Step 2 / step 4: C(stream ⊕ x) for rows[idx], sliced into tasks for ``map_fn``."""
    fn = score_exact if mode == "exact" else score_window
    tasks = [stream.task(mode, [rows[i] for i in idx[s: s + slice_size]]) for s in range(0, len(idx), slice_size)]
    parts = map_fn(fn, tasks)
    return np.concatenate(parts) if parts else np.zeros(0)


def zip_select(
    rows: Sequence[bytes],
    budget: int,
    ranks: np.ndarray,
    *,
    k1: int = 10_000,
    k2: int = 200,
    k3: int = 100,
    ser: str = "reference",
    mode: str = "exact",
    g: np.ndarray | None = None,
    map_fn: Callable[[Callable, Sequence], list] = serial_map,
    slice_size: int = 256,
) -> ZipResult:
    """Run the ZIP greedy loop and return exactly ``budget`` row indices.

    Args:
        rows: N serialised rows (``serialize_rows``).
        budget: B ≤ N.
        ranks: [N] uint64 r(id) for every tie.
        k1, k2, k3: candidate pool, tombstone batch, picks per iteration.
        ser: "reference" or "text" (the list framing; must match how ``rows`` were made).
        mode: "exact" or "window" (ZIP-lite).
        g: precomputed [N] g(x) (e.g. from a Ray map); computed here if None.
        map_fn: ``map_fn(fn, tasks) -> list`` used for steps 2 and 4 (``serial_map``,
            ``ProcessMap(n)``, or a Ray actor-pool map supplied by the pipeline).
        slice_size: candidates per task.

    Returns:
        ZipResult.
    """
    if mode not in ("exact", "window"):
        raise ValueError(f"mode must be 'exact' or 'window', got {mode!r}")
    n = len(rows)
    if not 0 <= budget <= n:
        raise ValueError(f"budget {budget} must be within [0, {n}]")
    fmt = ser_format(ser)
    ranks = np.asarray(ranks, np.uint64)
    g = g_scores(rows, fmt) if g is None else np.asarray(g, np.float64).copy()
    live = np.ones(n, bool)
    picked_mask = np.zeros(n, bool)
    picked: list[int] = []
    S = _Stream(fmt)
    trace_size, trace_ratio = [], []
    while len(picked) < budget:
        live_idx = np.flatnonzero(live)
        if len(live_idx) == 0:  # every unpicked row was tombstoned: lift the tombstones
            live = ~picked_mask
            continue
        cand = live_idx[top_k_indices(g[live_idx], k1, descending=False, tie_ranks=ranks[live_idx])]  # step 1
        g[cand] = _score(S, mode, rows, cand, map_fn, slice_size)  # step 2
        t2 = cand[top_k_indices(g[cand], k2, descending=False, tie_ranks=ranks[cand])]  # step 3
        live[t2] = False
        T, remaining = _Stream(fmt), t2
        for _ in range(min(k3, len(t2), budget - len(picked))):  # step 4
            c = _score(T, mode, rows, remaining, map_fn, slice_size)
            j = remaining[top_k_indices(c, 1, descending=False, tie_ranks=ranks[remaining])[0]]
            T.add(rows[j])
            remaining = remaining[remaining != j]
            picked.append(int(j))
            picked_mask[j] = True
            S.add(rows[j])  # step 5, row by row (same bytes as S ⊕ T)
        trace_size.append(len(picked))
        trace_ratio.append(S.ratio(mode))
    return ZipResult(np.array(picked, np.int64), trace_size, trace_ratio)
