"""When to prune and to what sparsity: the polynomial schedule of gradual pruning.

Zhu & Gupta's cubic schedule, used by the WoodFisher paper for its gradual experiments:

.. math::
    s_t = s_f + (s_i - s_f)\\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^3

for pruning steps ``t = t_0, t_0 + Δ, …, t_1``: large steps early, while the network has many
redundant weights, and small ones near the end.
"""

from __future__ import annotations

import math


def polynomial_sparsity(t: float, initial: float, final: float, start: float, end: float) -> float:
    """The target sparsity at time ``t`` (epochs or steps).

    Args:
        t: Current time.
        initial: Sparsity at ``start``.
        final: Sparsity from ``end`` on.
        start: Time of the first pruning step.
        end: Time of the last pruning step.

    Returns:
        ``initial`` before ``start``, ``final`` after ``end``, the cubic in between.

    Example:
        >>> polynomial_sparsity(0, 0.5, 0.9, 0, 4), polynomial_sparsity(4, 0.5, 0.9, 0, 4)
        (0.5, 0.9)
        >>> round(polynomial_sparsity(2, 0.5, 0.9, 0, 4), 4)
        0.85
    """
    if end <= start or t >= end:
        return final if t >= start else initial
    if t <= start:
        return initial
    frac = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def pruning_steps(
    initial: float, final: float, start: int, end: int, every: int
) -> dict[int, float]:
    """The pruning events of a gradual run: time → target sparsity.

    Args:
        initial: Sparsity of the first pruning step.
        final: Sparsity of the last pruning step.
        start: Time (epoch) of the first step.
        end: Time of the last step (included; ``end`` is a step even if ``every`` skips it).
        every: Time between steps.

    Returns:
        Ordered mapping from the time of each step to its target sparsity.

    Raises:
        ValueError: If the sparsities are outside [0, 1), ``final < initial``, ``every < 1`` or
            ``end < start``.

    Example:
        >>> pruning_steps(0.5, 0.9, 0, 4, 2)
        {0: 0.5, 2: 0.85, 4: 0.9}
    """
    for name, s in (("initial", initial), ("final", final)):
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"{name} sparsity must be in [0, 1), got {s}")
    if final < initial:
        raise ValueError(f"final sparsity {final} is below the initial sparsity {initial}")
    if every < 1:
        raise ValueError(f"prune_every must be >= 1, got {every}")
    if end < start:
        raise ValueError(f"the last pruning epoch ({end}) is before the first ({start})")
    times = list(range(start, end + 1, every))
    if times[-1] != end:
        times.append(end)
    return {t: polynomial_sparsity(t, initial, final, start, end) for t in times}


SCHEDULES = ("geometric", "cubic", "linear")


def interpolate(current: float, target: float, steps: int, kind: str = "cubic") -> list[float]:
    """Intermediate sparsities from ``current`` to ``target`` in ``steps`` equal time steps.

    ``geometric`` removes the same fraction of the remaining weights at every step, so the
    quadratic model behind each OBS step is asked to extrapolate equally far each time;
    ``cubic`` follows :func:`polynomial_sparsity` (large steps first while many weights are
    left); ``linear`` spaces them evenly. Used to reach a one-shot target in several prunes
    with fresh curvature between them.

    Args:
        current: Sparsity now.
        target: Final sparsity.
        steps: Number of steps (>= 1).
        kind: One of :data:`SCHEDULES`.

    Returns:
        ``steps`` sparsities, non-decreasing, ending at ``target`` exactly.

    Raises:
        ValueError: If ``kind`` is unknown.

    Example:
        >>> interpolate(0.0, 0.8, 2, "linear")
        [0.4, 0.8]
        >>> [round(s, 4) for s in interpolate(0.0, 0.99, 2, "geometric")]
        [0.9, 0.99]
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {list(SCHEDULES)}")
    if kind == "geometric":
        ratio = (1 - target) / (1 - current)
        out = [1 - (1 - current) * ratio ** (t / steps) for t in range(1, steps)]
    elif kind == "cubic":
        out = [polynomial_sparsity(t, current, target, 0, steps) for t in range(1, steps)]
    else:
        out = [current + (target - current) * t / steps for t in range(1, steps)]
    return [max(current, s) for s in out] + [target]


def auto_steps(current: float, target: float, max_removed: float = 0.25) -> int:
    """The fewest :func:`interpolate` ``geometric`` steps that each remove at most
    ``max_removed`` of the weights still present.

    Args:
        current: Sparsity now.
        target: Final sparsity.
        max_removed: Largest fraction of the remaining weights one step may remove, in (0, 1).

    Returns:
        At least 1.

    Example:
        >>> [auto_steps(0.0, s) for s in (0.5, 0.9, 0.95, 0.98)]
        [3, 9, 11, 14]
    """
    if target <= current:
        return 1
    ratio = math.log((1 - target) / (1 - current)) / math.log(1 - max_removed)
    return max(1, math.ceil(ratio - 1e-9))
