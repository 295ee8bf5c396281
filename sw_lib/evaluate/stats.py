"""Statistics, in one place: means with standard errors (as lm-evaluation-harness reports
them), bootstrap intervals, and the paired tests and intervals of the ablation studies."""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with n - 1 in the denominator (None below two values)."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample std / sqrt(n), lm-eval's `mean_stderr`."""
    std = sample_std(values)
    return None if std is None else std / math.sqrt(len(values))


def summarize(values: Sequence[float]) -> dict:
    return {"value": mean(values), "stderr": mean_stderr(values)}


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., float],
                       confidence: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(*samples)`, resampling units with replacement.

    `samples` are equally long arrays whose i-th entries belong to one unit (a perplexity
    window, a block of tokens) and are resampled together (paired). Seeded, so the same data
    give the same interval. None with fewer than two units (nothing to resample).
    """
    from scipy import stats

    arrays = tuple(np.asarray(s, dtype=np.float64) for s in samples)
    if len(arrays[0]) < 2:
        return None
    if all(np.all(a == a[0]) for a in arrays):  # every unit alike: the interval is a point
        value = float(statistic(*arrays))
        return value, value
    result = stats.bootstrap(arrays, statistic, paired=True, vectorized=False,
                             n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


# --- paired binary outcomes: exact test, interval, resolution ------------------------------
#
# One item evaluated twice (baseline, modified) is a pair of 0/1 outcomes. Only the discordant
# pairs carry information about the change: `improved` items (0 -> 1) and `worsened` items
# (1 -> 0). The change of the accuracy is (improved - worsened) / n.

ALPHA = 0.05  # two-sided significance level of the exact test
POWER = 0.8   # power at which the minimum detectable change is read


def discordant_counts(baseline: Sequence[float], modified: Sequence[float]) -> tuple[int, int]:
    """(improved, worsened): items that went 0 -> 1 and 1 -> 0, paired by position."""
    b = np.asarray(baseline, dtype=bool)
    m = np.asarray(modified, dtype=bool)
    if b.shape != m.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {b.size} and {m.size}")
    return int((m & ~b).sum()), int((b & ~m).sum())


def mcnemar_p_value(improved: int, worsened: int) -> float:
    """Exact two-sided McNemar p-value: under no change each of the d = improved + worsened
    discordant items is an improvement with probability 1/2, so
    p = min(1, 2 * P(Binomial(d, 1/2) <= min(improved, worsened))); 1 when d = 0."""
    from scipy import stats

    d = improved + worsened
    if d == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(improved, worsened), d, 0.5)))


def _tango_statistic(delta: float, improved: int, worsened: int, n: int) -> float:
    """Tango's score statistic for the hypothesis change == delta (Tango 1998, eq. 3)."""
    # Constrained maximum-likelihood probability of a worsened pair given change == delta.
    a = 2.0 * n
    b = -(improved + worsened) + (2.0 * n - improved + worsened) * delta
    c = -worsened * delta * (1.0 - delta)
    root = math.sqrt(max(b * b - 4.0 * a * c, 0.0))
    # The two forms are equal; each avoids cancellation on its side of b = 0.
    q = (root - b) / (2.0 * a) if b <= 0 else -2.0 * c / (root + b)
    variance = n * (2.0 * q + delta * (1.0 - delta))
    numerator = improved - worsened - n * delta
    if variance <= 1e-300:  # the ends delta = -1, 1: only an all-one-way sample sits there
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def _crossing(f, low: float, high: float, iterations: int = 60) -> float:
    """Bisection: the point in [low, high] where f turns from >= 0 (at low) to < 0 (at high)."""
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if f(mid) >= 0:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def paired_change_interval(improved: int, worsened: int, n: int,
                           confidence: float = 0.95) -> tuple[float, float] | None:
    """Tango's asymptotic score interval for the change of a paired proportion.

    The change is (improved - worsened) / n (modified minus baseline accuracy). The interval
    holds every delta whose score statistic |T(delta)| <= z_(1 - alpha/2) (Tango 1998,
    Stat Med 17:891; recommended by Fagerland, Lydersen & Laake 2014 for small samples).
    It depends only on the discordant counts and n, so with no discordant item it is
    +-z^2 / (n + z^2) (n = 4: +-0.49), never [0, 0]. (Newcombe's hybrid score interval
    collapses to [0, 0] there whenever both accuracies are 1/2, which is why not that one.)
    None when n == 0.
    """
    from scipy import stats

    if n <= 0:
        return None
    if not 0 <= improved + worsened <= n or improved < 0 or worsened < 0:
        raise ValueError(f"discordant counts ({improved}, {worsened}) do not fit n = {n} items")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    estimate = (improved - worsened) / n
    lower = _crossing(lambda d: _tango_statistic(d, improved, worsened, n) - z, -1.0, estimate)
    upper = _crossing(lambda d: _tango_statistic(d, improved, worsened, n) + z, estimate, 1.0)
    if estimate == -1.0:
        lower = -1.0
    if estimate == 1.0:
        upper = 1.0
    return lower, upper


@functools.lru_cache(maxsize=64)
def _critical_counts(n: int, alpha: float) -> np.ndarray:
    """For d = 0..n discordant items: the largest k with mcnemar_p_value(k, d - k) < alpha
    (the test rejects when min(improved, worsened) <= k); -1 when no split is significant."""
    from scipy import stats

    d = np.arange(n + 1)
    # Start from the normal approximation, then step k on the exact rule until it settles.
    z = stats.norm.isf(alpha / 2)
    k = np.maximum(np.floor(d / 2 - z * np.sqrt(d) / 2), -1).astype(np.int64)
    while True:
        down = (k >= 0) & (2 * stats.binom.cdf(k, d, 0.5) >= alpha)
        up = ~down & (2 * stats.binom.cdf(k + 1, d, 0.5) < alpha)
        if not (down.any() or up.any()):
            break
        k = k - down + up
    k.setflags(write=False)  # shared by every caller through the cache
    return k


def mcnemar_power(n: int, change: float, discordance: float, alpha: float = ALPHA) -> float:
    """Probability that the exact McNemar test rejects at `alpha` over n items, when each
    item improves with probability (discordance + change) / 2 and worsens with probability
    (discordance - change) / 2, independently. Exact (sums over the number of discordant
    items), no normal approximation."""
    from scipy import stats

    change = abs(change)
    if not 0 <= change <= discordance <= 1:
        raise ValueError(f"need 0 <= |change| <= discordance <= 1, got {change}, {discordance}")
    if discordance == 0:
        return 0.0
    # Only numbers of discordant items with probability above 1e-12 matter (n can be 10^4).
    first = int(stats.binom.ppf(1e-12, n, discordance))
    last = int(stats.binom.isf(1e-12, n, discordance))
    d = np.arange(max(first - 1, 0), min(last + 1, n) + 1)
    k = _critical_counts(n, alpha)[d]
    up = min(1.0, (discordance + change) / (2 * discordance))  # P(improved | discordant)
    reject = stats.binom.cdf(k, d, up) + stats.binom.sf(d - k - 1, d, up)
    reject = np.where(k >= 0, reject, 0.0)
    return float(np.sum(stats.binom.pmf(d, n, discordance) * reject))


def minimum_detectable_change(n: int, discordance_rate: float, alpha: float = ALPHA,
                              power: float = POWER) -> float | None:
    """The smallest |change| of a paired accuracy that the exact McNemar test at `alpha`
    (two-sided) detects with probability `power`, at n items.

    Definition: the smallest c with mcnemar_power(n, c, max(discordance_rate, c)) >= power.
    The discordance (share of items whose outcome differs) is the observed one, raised to c
    when c needs more (a change c moves at least c of the items). So the answer never goes
    below the floor set by the test itself: with every discordant item one way, the test
    needs 6 of them (2 / 2^6 < 0.05), and must see them with probability `power`. Read it
    as "at this n and this amount of churn, a change smaller than +-MDE cannot be resolved".
    None when no change can be (n < 6 at alpha 0.05). Found by bisection to 1e-5.
    """
    if n <= 0 or mcnemar_power(n, 1.0, 1.0, alpha) < power:
        return None
    rate = min(max(float(discordance_rate), 0.0), 1.0)

    def short(c: float) -> float:  # >= 0 while c is still too small to detect
        return power - mcnemar_power(n, c, max(rate, c), alpha)

    low, high = 0.0, 1.0
    while high - low > 1e-5:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if short(mid) > 0 else (low, mid)
    return high


# --- perplexity ratio over windows ---------------------------------------------------------


def perplexity_ratio_interval(baseline_nll: Sequence[float], modified_nll: Sequence[float],
                              tokens_per_window: int, confidence: float = 0.95,
                              seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Paired percentile bootstrap interval of perplexity(modified) / perplexity(baseline).

    The units are windows: each resample draws windows with replacement, keeping a window's
    baseline and modified summed NLL together, and computes
    exp((sum modified - sum baseline) / (windows * tokens_per_window)), the ratio of the two
    perplexities on those windows. None with fewer than two windows or a non-finite NLL (a
    destroyed model has no interval: its ratio is infinite).
    """
    base = np.asarray(baseline_nll, dtype=np.float64)
    mod = np.asarray(modified_nll, dtype=np.float64)
    if base.shape != mod.shape:
        raise ValueError(f"per-window NLLs are not paired: {base.size} vs {mod.size} windows")
    if base.size < 2 or not (np.all(np.isfinite(base)) and np.all(np.isfinite(mod))):
        return None

    def ratio(b, m):
        return float(np.exp((m.sum() - b.sum()) / (b.size * tokens_per_window)))

    return bootstrap_interval((base, mod), ratio, confidence=confidence, seed=seed)
