"""The paper's classical baselines on the same QUBO energy: a genetic algorithm and REINFORCE.

Both see only the energy of whole assignments, evaluated in batches, and both get a budget of
``evaluations`` energies. One evaluation touches every coupling once, as one sweep of simulated
annealing does, so ``evaluations = reads × sweeps`` gives them the arithmetic of an annealing
run of ``reads`` reads of ``sweeps`` sweeps. The paper's GA and RL settings are not public;
these are textbook choices (documented in ``docs/qubo.md``).

Example:
    >>> import dimod
    >>> bqm = dimod.BinaryQuadraticModel({"a": -1, "b": -1}, {("a", "b"): 3}, 0, "BINARY")
    >>> energies = EnergyBatch(bqm)
    >>> energies(np.array([[0, 0], [1, 0], [1, 1]])).tolist()
    [0.0, -1.0, 1.0]
    >>> float(genetic(bqm, evaluations=200, seed=0).first.energy)
    -1.0
"""

from __future__ import annotations

import dimod
import numpy as np
import scipy.sparse as sp

__all__ = ["EnergyBatch", "genetic", "reinforce"]


class EnergyBatch:
    """Energies of many assignments at once: ``X h + rowsum((X J) ∘ X) + offset``.

    Args:
        bqm: A binary quadratic model (BINARY or SPIN; SPIN is converted).

    Attributes:
        variables: Column order of the assignments.
    """

    def __init__(self, bqm: dimod.BinaryQuadraticModel):
        if bqm.vartype is not dimod.BINARY:
            bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
        self.variables = list(bqm.variables)
        h, (row, col, q), offset = bqm.to_numpy_vectors(self.variables)
        n = len(self.variables)
        self.h = np.asarray(h, dtype=np.float64)
        self.J = sp.csr_matrix((q, (row, col)), shape=(n, n), dtype=np.float64)
        self.offset = float(offset)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Energies of the rows of ``X`` (0/1).

        Returns:
            (rows,) energies.
        """
        X = np.asarray(X, dtype=np.float64)
        return X @ self.h + np.einsum("ij,ij->i", np.asarray(self.J.T @ X.T).T, X) + self.offset


def _sampleset(bqm, energy: EnergyBatch, X: np.ndarray, info: dict) -> dimod.SampleSet:
    X = np.asarray(X, dtype=np.int8)
    ss = dimod.SampleSet.from_samples(
        (X, energy.variables), vartype=dimod.BINARY, energy=energy(X), info=info
    )
    return ss


def genetic(
    bqm: dimod.BinaryQuadraticModel,
    evaluations: int = 64_000,
    population: int = 64,
    seed: int = 0,
    tournament: int = 3,
    crossover: float = 0.9,
    elite: int = 2,
) -> dimod.SampleSet:
    """Minimise the energy with a generational GA.

    Tournament selection, uniform crossover, bit-flip mutation with rate ``1/n`` and elitism:
    the standard binary GA.

    Args:
        bqm: The problem.
        evaluations: Energy evaluations in all (the initial population included).
        population: Individuals per generation.
        seed: Seed of numpy's generator.
        tournament: Tournament size.
        crossover: Probability that a child mixes two parents (else it copies one).
        elite: Best individuals copied unchanged into the next generation.

    Returns:
        The final population as a sample set (lowest energy first via ``.first``), with
        ``info["evaluations"]`` and ``info["best_trace"]`` (best energy after each generation).

    Raises:
        ValueError: If a size is not positive.
    """
    if min(evaluations, population, tournament) < 1 or not 0 <= elite < population:
        raise ValueError(
            f"need evaluations, population, tournament >= 1 and 0 <= elite < population; got "
            f"{evaluations}, {population}, {tournament}, {elite}"
        )
    energy = EnergyBatch(bqm)
    n = len(energy.variables)
    rng = np.random.default_rng(seed)
    pop = rng.integers(0, 2, size=(population, n), dtype=np.int8)
    fit = energy(pop)
    used, trace = population, [float(fit.min())]
    best_x, best_e = pop[fit.argmin()].copy(), float(fit.min())
    children = population - elite
    while used + children <= evaluations:
        idx = rng.integers(0, population, size=(2, children, tournament))
        parents = idx[np.arange(2)[:, None], np.arange(children)[None, :],
                      fit[idx].argmin(-1)]
        a, b = pop[parents[0]], pop[parents[1]]
        mix = rng.random((children, n)) < 0.5
        child = np.where(mix & (rng.random((children, 1)) < crossover), b, a)
        flip = rng.random((children, n)) < 1.0 / max(n, 1)
        child = np.where(flip, 1 - child, child).astype(np.int8)
        child_fit = energy(child)
        used += children
        keep = np.argsort(fit, kind="stable")[:elite]
        pop = np.concatenate([pop[keep], child])
        fit = np.concatenate([fit[keep], child_fit])
        if fit.min() < best_e:
            best_e, best_x = float(fit.min()), pop[fit.argmin()].copy()
        trace.append(best_e)
    pop[0] = best_x
    return _sampleset(bqm, energy, pop, {"evaluations": used, "best_trace": trace})


def reinforce(
    bqm: dimod.BinaryQuadraticModel,
    evaluations: int = 64_000,
    batch: int = 64,
    seed: int = 0,
    lr: float = 0.1,
) -> dimod.SampleSet:
    """Minimise the energy with REINFORCE over independent Bernoulli decisions.

    The policy is one logit per variable; each step draws ``batch`` assignments, scores them by
    ``−energy``, standardises the rewards within the batch (the baseline) and takes an Adam
    step on ``E[(R − b) ∇ log π]``.

    Args:
        bqm: The problem.
        evaluations: Energy evaluations in all.
        batch: Assignments per policy step.
        seed: Seed of numpy's generator.
        lr: Adam's learning rate.

    Returns:
        The best assignment seen (first) and the last batch, as a sample set, with
        ``info["evaluations"]`` and ``info["best_trace"]``.

    Raises:
        ValueError: If a size is not positive.
    """
    if min(evaluations, batch) < 1 or not lr > 0:
        raise ValueError(
            f"need evaluations, batch >= 1 and lr > 0; got {evaluations}, {batch}, {lr}"
        )
    energy = EnergyBatch(bqm)
    n = len(energy.variables)
    rng = np.random.default_rng(seed)
    theta = np.zeros(n)
    m, v = np.zeros(n), np.zeros(n)
    b1, b2, eps = 0.9, 0.999, 1e-8
    best_x, best_e, used, trace, step = None, np.inf, 0, [], 0
    X = np.zeros((0, n), dtype=np.int8)
    while used + batch <= evaluations:
        prob = 1 / (1 + np.exp(-theta))
        X = (rng.random((batch, n)) < prob).astype(np.int8)
        E = energy(X)
        used += batch
        if E.min() < best_e:
            best_e, best_x = float(E.min()), X[E.argmin()].copy()
        trace.append(best_e)
        adv = -(E - E.mean()) / (E.std() + 1e-12)
        grad = -(adv[:, None] * (X - prob)).mean(0)  # descent direction on −reward
        step += 1
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        theta -= lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + eps)
    if best_x is None:
        raise ValueError(f"evaluations={evaluations} is smaller than one batch ({batch})")
    out = np.concatenate([best_x[None], X])
    return _sampleset(bqm, energy, out, {"evaluations": used, "best_trace": trace})
