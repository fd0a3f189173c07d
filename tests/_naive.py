"""Deliberately naive reference implementations of the memorization metrics (METRICS.md).

Written differently from ``memsurgery.metrics`` on purpose: plain Python loops over points,
units and classes, the ``math`` and ``statistics`` modules, nested lists instead of tensors,
no vectorization. Tests load this file by path (see ``load_naive`` in each test file), so it
works under ``pytest --import-mode=importlib``.
"""

from __future__ import annotations

import itertools
import math
import statistics

EPS = 1e-12
NAN = float("nan")


def _flat(x) -> list[float]:
    """One sample (tensor/array/nested list) as a flat list of Python floats."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (int, float)):
        return [float(x)]
    out: list[float] = []
    for item in x:
        out.extend(_flat(item))
    return out


def _rows(m) -> list[list[float]]:
    return [[float(v) for v in row] for row in (m.tolist() if hasattr(m, "tolist") else m)]


def _vec(v) -> list[float]:
    return [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]


# --------------------------------------------------------------------------- distances


def normalize(vec: list[float], eps: float = EPS) -> list[float]:
    """n(z) = z / max(||z||_2, eps)."""
    norm = math.sqrt(math.fsum(v * v for v in vec))
    d = max(norm, eps)
    return [v / d for v in vec]


def distance(a_sample, b_sample, kind: str) -> float:
    na, nb = normalize(_flat(a_sample)), normalize(_flat(b_sample))
    if kind == "l2":
        return math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(na, nb, strict=True)))
    if kind == "l1":
        return math.fsum(abs(x - y) for x, y in zip(na, nb, strict=True))
    cos = math.fsum(x * y for x, y in zip(na, nb, strict=True))
    cos = min(1.0, max(-1.0, cos))
    if kind == "cosine":
        return 1.0 - cos
    if kind == "angular":
        return math.acos(cos) / math.pi
    raise KeyError(kind)


def pair_distance(a, b, kind: str) -> list[float]:
    return [distance(a[i], b[i], kind) for i in range(len(a))]


# --------------------------------------------------------------------------- SSLMem / LayerMem


def sslmem(align_f, align_g, normalize: str = "ratio"):
    af, ag = _vec(align_f), _vec(align_g)
    raw = [g - f for f, g in zip(af, ag, strict=True)]
    if normalize == "none":
        return raw
    if normalize == "ratio":
        out = []
        for f, g in zip(af, ag, strict=True):
            if f == 0.0 and g == 0.0:
                out.append(0.0)
            else:
                out.append((g - f) / (g + f))
        return out
    if normalize == "range":
        hi, lo = raw[0], raw[0]
        for r in raw:
            hi, lo = max(hi, r), min(lo, r)
        div = hi - lo
        return [r / div for r in raw], div
    raise KeyError(normalize)


def ranked_positions(rank_by, k: int, largest: bool) -> list[int]:
    """Positions of the k highest (lowest) values; ties keep the lower position first."""
    r = _vec(rank_by)
    positions = list(range(len(r)))
    # Python's sort is stable: equal keys keep their original (position) order
    positions.sort(key=(lambda i: -r[i]) if largest else (lambda i: r[i]))
    return positions[:k]


def layermem(scores: dict, rank_by=None, top_k: int | None = None, least_k: int | None = None):
    if isinstance(rank_by, str):
        rank_by = scores[rank_by]
    sel = None
    if top_k is not None:
        sel = ranked_positions(rank_by, top_k, largest=True)
    elif least_k is not None:
        sel = ranked_positions(rank_by, least_k, largest=False)
    out = {}
    for name, v in scores.items():
        vals = _vec(v)
        chosen = vals if sel is None else [vals[i] for i in sel]
        out[name] = math.fsum(chosen) / len(chosen)
    return out


# --------------------------------------------------------------------------- UnitMem / ClassMem


def activate(x: float, activation: str) -> float:
    if activation == "raw":
        return x
    if activation == "relu":
        return x if x > 0 else 0.0
    if activation == "abs":
        return abs(x)
    raise KeyError(activation)


def ratio(top: float, rest: float) -> tuple[float, bool]:
    """(score, invalid) of (top - rest) / (top + rest) with the METRICS.md §4 conventions."""
    if top == 0.0 and rest == 0.0:
        return 0.0, False  # a unit that never fires
    den = top + rest
    if den <= 0.0:
        return NAN, True
    return (top - rest) / den, False


def unitmem(mu, reduction: str = "mean", activation: str = "raw", index=None):
    """Returns (scores, argmax, invalid_units) as Python lists / int."""
    rows = _rows(mu)
    n = len(rows)
    keys = list(range(n)) if index is None else [int(i) for i in _vec(index)]
    units = len(rows[0])
    scores, argmax, invalid = [], [], 0
    for u in range(units):
        col = [activate(rows[i][u], activation) for i in range(n)]
        top = col[0]
        for value in col:
            if value > top:
                top = value
        # among the rows reaching the top, the lowest dataset index (or row) wins
        best = None
        for i in range(n):
            if col[i] == top and (best is None or keys[i] < keys[best]):
                best = i
        others = [col[i] for i in range(n) if i != best]
        if reduction == "mean":
            rest = math.fsum(others) / len(others)
        elif reduction == "median":
            rest = statistics.median(others)
        else:
            raise KeyError(reduction)
        s, bad = ratio(top, rest)
        scores.append(s)
        argmax.append(keys[best])
        invalid += int(bad)
    return scores, argmax, invalid


def classmem(act, labels, activation: str = "raw"):
    """Returns (scores, argmax class labels, invalid_units)."""
    rows = _rows(act)
    labs = [int(v) for v in _vec(labels)]
    members: dict[int, list[int]] = {}
    for i, c in enumerate(labs):
        members.setdefault(c, []).append(i)
    classes = sorted(members)
    units = len(rows[0])
    scores, argmax, invalid = [], [], 0
    for u in range(units):
        means = {}
        for c in classes:
            vals = [rows[i][u] for i in members[c]]
            means[c] = activate(math.fsum(vals) / len(vals), activation)
        best = classes[0]
        for c in classes:  # ascending labels: strict '>' keeps the lowest label among ties
            if means[c] > means[best]:
                best = c
        others = [means[c] for c in classes if c != best]
        rest = math.fsum(others) / len(others)
        s, bad = ratio(means[best], rest)
        scores.append(s)
        argmax.append(best)
        invalid += int(bad)
    return scores, argmax, invalid


# --------------------------------------------------------------------------- statistics


def kendall_tau_b(x, y) -> float:
    xs, ys = _vec(x), _vec(y)
    n = len(xs)
    concordant = discordant = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                tie_x += 1
                tie_y += 1
            elif dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    return (concordant - discordant) / math.sqrt((n0 - tie_x) * (n0 - tie_y))


def kendall_s(xs: list[float], ys: list[float]) -> int:
    s = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            prod = (xs[i] - xs[j]) * (ys[i] - ys[j])
            s += (prod > 0) - (prod < 0)
    return s


def kendall_exact_pvalue(x, y) -> float:
    """Two-sided exact p-value by enumerating every permutation of y (no ties; small n only)."""
    xs, ys = _vec(x), _vec(y)
    observed = abs(kendall_s(xs, ys))
    extreme = total = 0
    for perm in itertools.permutations(ys):
        total += 1
        extreme += abs(kendall_s(xs, list(perm))) >= observed
    return extreme / total


def kendall_asymptotic_pvalue(x, y) -> float:
    """Two-sided normal-approximation p-value of Kendall's S without ties."""
    xs, ys = _vec(x), _vec(y)
    n = len(xs)
    var = n * (n - 1) * (2 * n + 5) / 18.0
    z = kendall_s(xs, ys) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2.0))


def _mean_var(v: list[float]) -> tuple[float, float]:
    m = math.fsum(v) / len(v)
    return m, math.fsum((x - m) ** 2 for x in v) / (len(v) - 1)


def welch(a, b) -> tuple[float, float]:
    """Welch's t statistic of mean(a) - mean(b) and its Welch–Satterthwaite degrees of freedom."""
    xa, xb = _vec(a), _vec(b)
    ma, va = _mean_var(xa)
    mb, vb = _mean_var(xb)
    sa, sb = va / len(xa), vb / len(xb)
    t = (ma - mb) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(xa) - 1) + sb**2 / (len(xb) - 1))
    return t, df


def student(a, b) -> tuple[float, float]:
    """Pooled-variance t statistic and its degrees of freedom (na + nb - 2)."""
    xa, xb = _vec(a), _vec(b)
    ma, va = _mean_var(xa)
    mb, vb = _mean_var(xb)
    na, nb = len(xa), len(xb)
    pooled = ((na - 1) * va + (nb - 1) * vb) / (na + nb - 2)
    t = (ma - mb) / math.sqrt(pooled * (1.0 / na + 1.0 / nb))
    return t, float(na + nb - 2)


def topk_overlap(scores: dict, k: int) -> dict:
    tops = {name: set(ranked_positions(v, k, largest=True)) for name, v in scores.items()}
    out = {}
    for a in tops:
        for b in tops:
            shared = 0
            for p in tops[a]:
                if p in tops[b]:
                    shared += 1
            out[(a, b)] = shared / k
    return out
