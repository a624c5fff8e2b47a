"""The exact multiple-choice knapsack: one option per item, total bytes within the budget, least
total loss. Pure numpy, no torch.

Each item (a table, the MLP) has options ``(bytes, loss)``; :func:`solve` returns the choice whose
bytes sum to at most the budget (integer bytes, compared exactly: the budget is never exceeded)
with the least summed loss, or raises :class:`Infeasible` with the fewest bytes any choice takes.

Method: dynamic programming over the Pareto frontier. After items ``0..j`` the states are every
non-dominated ``(bytes, loss)`` of their partial choices (fewer bytes, or less loss, than every
other); a state is dropped when even the smallest options of the remaining items would exceed the
budget, or when a lower bound of its best completion is above a known feasible choice. The
bound is the linear-programming relaxation of the remaining items (each may take a convex mix of
two options), which the greedy walk along the lower convex hulls of their options solves exactly
(Sinha and Zoltners, "The multiple-choice knapsack problem", Operations Research 27(3), 1979).
No state that could lead to an optimum is ever dropped, so the result is optimal: it is the brute
force's answer on every case small enough to enumerate (``tests/test_budget.py``). Of choices
with equal loss, one with the fewest bytes is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Options = Sequence[tuple[int, float]]


class Infeasible(ValueError):
    """No choice fits the budget; ``min_bytes`` is the fewest bytes any choice takes."""

    def __init__(self, budget: int, min_bytes: int) -> None:
        super().__init__(
            f"budget {budget:,} bytes is below the smallest choice, {min_bytes:,} bytes"
        )
        self.budget = budget
        self.min_bytes = min_bytes


@dataclass(frozen=True)
class Solution:
    """The chosen option index of every item, their total bytes and total loss, and the largest
    number of states the search held (what it cost)."""

    choice: tuple[int, ...]
    bytes: int
    loss: float
    states: int


def min_bytes(items: Sequence[Options]) -> int:
    """The fewest bytes any choice takes: the smallest option of every item."""
    return sum(min(int(b) for b, _ in options) for options in items)


def solve(items: Sequence[Options], budget: int) -> Solution:
    """The least-loss choice of one option per item within ``budget`` bytes (see the module
    docstring). ``ValueError`` for an item without options, negative bytes or a non-finite loss;
    :class:`Infeasible` when even the smallest options exceed the budget."""
    checked = [_check_item(i, options) for i, options in enumerate(items)]
    floor = sum(int(b.min()) for b, _ in checked)
    if floor > budget:
        raise Infeasible(budget, floor)
    # per item, the options no other option dominates (the search needs only those)
    kept = [_undominated(b, loss) for b, loss in checked]
    suffix_min = np.zeros(len(items) + 1, dtype=np.int64)
    for j in range(len(items) - 1, -1, -1):
        suffix_min[j] = suffix_min[j + 1] + int(checked[j][0].min())
    bounds = [_relaxation(checked[j:]) for j in range(len(items) + 1)]
    incumbent = _greedy(checked, budget)
    tolerance = 1e-9 * (1.0 + abs(incumbent))

    state_bytes = np.zeros(1, dtype=np.int64)
    state_loss = np.zeros(1, dtype=np.float64)
    trail: list[
        tuple[np.ndarray, np.ndarray]
    ] = []  # per item: (parent state, option) of each state
    largest = 1
    for j, keep in enumerate(kept):
        b, loss = checked[j]
        cand_bytes = (state_bytes[:, None] + b[keep][None, :]).reshape(-1)
        cand_loss = (state_loss[:, None] + loss[keep][None, :]).reshape(-1)
        parent = np.repeat(np.arange(len(state_bytes)), len(keep))
        option = np.tile(keep, len(state_bytes))
        room = budget - cand_bytes
        ok = room >= suffix_min[j + 1]
        ok &= cand_loss + bounds[j + 1](room) <= incumbent + tolerance
        cand_bytes, cand_loss, parent, option = (
            cand_bytes[ok],
            cand_loss[ok],
            parent[ok],
            option[ok],
        )
        order = np.lexsort((option, parent, cand_loss, cand_bytes))
        cand_bytes, cand_loss = cand_bytes[order], cand_loss[order]
        parent, option = parent[order], option[order]
        front = _pareto(cand_loss)
        state_bytes, state_loss = cand_bytes[front], cand_loss[front]
        trail.append((parent[front], option[front]))
        largest = max(largest, len(state_bytes))
    if len(state_loss) == 0:  # cannot happen: the greedy incumbent's own path is never dropped
        raise AssertionError("the knapsack search dropped every state")
    best = int(np.argmin(state_loss))  # the first of equal losses has the fewest bytes
    choice = []
    for parent, option in reversed(trail):
        choice.append(int(option[best]))
        best = int(parent[best])
    choice.reverse()
    total_bytes = sum(int(checked[j][0][o]) for j, o in enumerate(choice))
    total_loss = float(sum(float(checked[j][1][o]) for j, o in enumerate(choice)))
    return Solution(tuple(choice), total_bytes, total_loss, largest)


def brute_force(items: Sequence[Options], budget: int) -> tuple[tuple[int, ...], float] | None:
    """Every choice enumerated (tests only: the product of the option counts): the least loss
    within the budget and its choice, or ``None`` when nothing fits."""
    import itertools

    best: tuple[tuple[int, ...], float] | None = None
    for choice in itertools.product(*(range(len(o)) for o in items)):
        nbytes = sum(int(items[j][o][0]) for j, o in enumerate(choice))
        loss = sum(float(items[j][o][1]) for j, o in enumerate(choice))
        if nbytes <= budget and (best is None or loss < best[1]):
            best = (choice, loss)
    return best


def _check_item(index: int, options: Options) -> tuple[np.ndarray, np.ndarray]:
    if len(options) == 0:
        raise ValueError(f"item {index} has no options")
    b = np.array([int(o[0]) for o in options], dtype=np.int64)
    loss = np.array([float(o[1]) for o in options], dtype=np.float64)
    if (b < 0).any():
        raise ValueError(f"item {index}: negative bytes")
    if not np.isfinite(loss).all():
        raise ValueError(f"item {index}: a loss is not finite")
    return b, loss


def _undominated(b: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the options that no other option matches or beats in both bytes and loss (of
    equal ones, the lowest index), in index order."""
    order = np.lexsort((np.arange(len(b)), loss, b))
    return np.sort(order[_pareto(loss[order])])


def _pareto(loss_by_bytes: np.ndarray) -> np.ndarray:
    """Mask of the entries, sorted by bytes then loss, whose loss is below every earlier one."""
    if len(loss_by_bytes) == 0:
        return np.zeros(0, dtype=bool)
    running = np.minimum.accumulate(loss_by_bytes)
    mask = np.ones(len(loss_by_bytes), dtype=bool)
    mask[1:] = loss_by_bytes[1:] < running[:-1]
    return mask


class _Relaxation:
    """The linear-programming relaxation's least loss of some items as a function of the bytes
    left (convex, piecewise linear, non-increasing; ``inf`` below their smallest options)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray) -> None:
        self.xs, self.ys = xs, ys

    def __call__(self, room: np.ndarray) -> np.ndarray:
        room = np.asarray(room)
        out = np.interp(room.astype(np.float64), self.xs, self.ys)
        return np.where(room < self.xs[0], np.inf, out)


def _hull(b: np.ndarray, loss: np.ndarray) -> list[tuple[float, float]]:
    """The lower convex hull of an item's options from its fewest bytes on, as the segments
    ``(added bytes, added loss)`` along which the loss falls."""
    order = np.lexsort((loss, b))
    points: list[tuple[int, float]] = []
    for i in order:
        x, y = int(b[i]), float(loss[i])
        if points and x == points[-1][0]:
            continue  # same bytes, more loss
        if points and y >= points[-1][1]:
            continue  # more bytes for no less loss
        while len(points) >= 2:
            (x1, y1), (x2, y2) = points[-2], points[-1]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):  # the middle point is not below
                points.pop()
            else:
                break
        points.append((x, y))
    return [
        (float(x2 - x1), y2 - y1) for (x1, y1), (x2, y2) in zip(points, points[1:], strict=False)
    ]


def _relaxation(items: Sequence[tuple[np.ndarray, np.ndarray]]) -> _Relaxation:
    base_bytes = float(sum(int(b.min()) for b, _ in items))
    base_loss = 0.0
    segments: list[tuple[float, float]] = []
    for b, loss in items:
        least = b == b.min()
        base_loss += float(loss[least].min())
        segments += _hull(b, loss)
    segments.sort(key=lambda s: s[1] / s[0])  # steepest fall of loss per byte first
    xs = [base_bytes]
    ys = [base_loss]
    for dx, dy in segments:
        xs.append(xs[-1] + dx)
        ys.append(ys[-1] + dy)
    return _Relaxation(np.array(xs), np.array(ys))


def _greedy(items: Sequence[tuple[np.ndarray, np.ndarray]], budget: int) -> float:
    """The loss of a feasible choice: every item at its smallest option (least loss among equal
    bytes), then hull steps in order of steepest loss per byte while they fit."""
    chosen_bytes = [int(b.min()) for b, _ in items]
    chosen_loss = [float(loss[b == b.min()].min()) for b, loss in items]
    steps = [(dy / dx, j, dx, dy) for j, (b, loss) in enumerate(items) for dx, dy in _hull(b, loss)]
    steps.sort(key=lambda s: s[0])
    room = budget - sum(chosen_bytes)
    blocked: set[int] = set()
    for _, j, dx, dy in steps:  # an item's hull steps come in order; a skipped one ends the item
        if j in blocked:
            continue
        if dx <= room:
            room -= int(dx)
            chosen_loss[j] += dy
        else:
            blocked.add(j)
    return float(sum(chosen_loss))
