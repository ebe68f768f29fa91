"""ZIP exact mode vs a literal implementation of the definition; parallel == serial; exactly B."""

import zlib

import numpy as np
import pytest

from effsft.select import zip as Z
from effsft.select.ranking import random_rank

WORDS = "alpha beta gamma delta code python list sort tree graph cat dog sun moon rain river".split()


def _corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 10 == 9:  # exact duplicates create ties that only r(id) can break
            rows.append(rows[i - 5])
            continue
        words = rng.choice(WORDS, rng.integers(3, 40))
        rep = int(rng.integers(1, 4))
        rows.append([{"role": "user", "content": f"q{i} " + " ".join(words[:3])},
                     {"role": "assistant", "content": " ".join(list(words) * rep)}])
    return rows


def _naive_zip(msgs, B, ranks, K1, K2, K3):
    def C(D):  # literal C(D) on the Python repr of a list of conversations
        s = ("[" + ", ".join(repr(m) for m in D) + "]").encode()
        return len(s) / len(zlib.compress(s, 9))

    key = lambda score: (lambda i: (score[i], int(ranks[i])))  # noqa: E731
    g = {i: C([msgs[i]]) for i in range(len(msgs))}
    live, S = set(range(len(msgs))), []
    while len(S) < B:
        cand = sorted(live, key=key(g))[:K1]
        for x in cand:
            g[x] = C([msgs[s] for s in S] + [msgs[x]])
        T2 = sorted(cand, key=key(g))[:K2]
        live -= set(T2)
        T = []
        for _ in range(min(K3, len(T2))):
            c = {x: C([msgs[t] for t in T] + [msgs[x]]) for x in T2 if x not in T}
            T.append(min(c, key=key(c)))
        S += T
    return S[:B]


@pytest.fixture(scope="module")
def data():
    msgs = _corpus()
    ranks = random_rank([f"r{i}" for i in range(len(msgs))], 0)
    return msgs, Z.serialize_rows(msgs, "reference"), ranks


def test_g_and_serialisation(data):
    msgs, rows, _ = data
    assert rows[0] == repr(msgs[0]).encode()
    s = ("[" + repr(msgs[0]) + "]").encode()
    assert Z.g_scores(rows[:1], Z.ser_format("reference"))[0] == len(s) / len(zlib.compress(s, 9))
    assert Z.serialize_row(msgs[0], "text").startswith(b"user: q0 ")


def test_exact_matches_naive_definition(data):
    msgs, rows, ranks = data
    want = _naive_zip(msgs, 42, ranks, 50, 10, 5)
    res = Z.zip_select(rows, 42, ranks, k1=50, k2=10, k3=5, mode="exact", slice_size=16)
    assert list(res.picked) == want
    assert len(res.trace_size) == len(res.trace_ratio) and res.trace_size[-1] == 42


@pytest.mark.parametrize("mode", ["exact", "window"])
def test_parallel_equals_serial(data, mode):
    _, rows, ranks = data
    serial = Z.zip_select(rows, 30, ranks, k1=50, k2=10, k3=5, mode=mode, slice_size=7)
    with Z.ProcessMap(2) as pmap:
        par = Z.zip_select(rows, 30, ranks, k1=50, k2=10, k3=5, mode=mode, slice_size=7, map_fn=pmap)
    assert list(par.picked) == list(serial.picked)


@pytest.mark.parametrize("mode", ["exact", "window"])
@pytest.mark.parametrize("B", [1, 7, 120])
def test_exactly_b_distinct(data, mode, B):
    _, rows, ranks = data
    rows, ranks = rows[:150], ranks[:150]  # B=120 needs the tombstones lifted (K2/K3 = 2)
    res = Z.zip_select(rows, B, ranks, k1=30, k2=10, k3=5, mode=mode)
    assert len(res.picked) == B == len(set(res.picked.tolist()))


def test_window_scores_track_exact(data):
    _, rows, _ = data
    fmt = Z.ser_format("reference")
    S = Z._Stream(fmt)
    for r in rows[:60]:
        S.add(r)
    cands = rows[100:160]
    ex = Z.score_exact(S.task("exact", cands))
    win = Z.score_window(S.task("window", cands))
    np.testing.assert_allclose(win, ex, rtol=0.03)
    assert S.ratio("window") == pytest.approx(S.ratio("exact"), rel=0.03)
    assert np.corrcoef(win, ex)[0, 1] > 0.9
