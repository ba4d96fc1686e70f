"""Built-in data: 2-D toy densities, simulators of higher dimension, MiniBooNE if present.

The 2-D shapes follow the usual flow benchmarks (FFJORD, NSF): eight Gaussians,
checkerboard, two spirals and pinwheel. Two simulators give data of higher
dimension: Neal's funnel (6-D, with a closed-form density) and the observations
of the SLCP model ("simple likelihood, complex posterior", Papamakarios et al.
2019; 8-D), whose parameter-observation pairs are also a conditional task
(the posterior `p(theta | x)`, 5-D given 8-D, on a bounded prior support).
All generators are NumPy only, deterministic given `seed`, and return float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "SLCP_PRIOR_BOUND",
    "TOY_DATASETS",
    "checkerboard",
    "conditional_ring",
    "eight_gaussians",
    "funnel",
    "funnel_log_prob",
    "load_miniboone",
    "load_shared_toy",
    "make_toy",
    "miniboone_dir",
    "pinwheel",
    "shared_data_dir",
    "slcp",
    "slcp_simulate",
    "two_spirals",
]


def eight_gaussians(n: int, seed: int = 0) -> np.ndarray:
    """Eight Gaussians (std 0.5) on a circle of radius 4 (scaled by 1/1.414)."""
    rng = np.random.default_rng(seed)
    angles = np.arange(8) * np.pi / 4
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, 2))
    return (points / 1.414).astype(np.float32)


def checkerboard(n: int, seed: int = 0) -> np.ndarray:
    """Uniform on the black squares of a 4 x 4 board spanning [-4, 4]^2."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(-4.0, 4.0, n)
    x2 = rng.uniform(0.0, 2.0, n) - 4.0 * rng.integers(0, 2, n)
    x2 = x2 + 2.0 * (np.floor(x1 / 2.0) % 2)
    return np.stack([x1, x2], axis=1).astype(np.float32)


def two_spirals(n: int, seed: int = 0) -> np.ndarray:
    """Two interleaved noisy spirals."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.0, 1.0, n)) * 540.0 * (2 * np.pi) / 360.0
    d1x = -np.cos(t) * t + rng.uniform(0.0, 1.0, n) * 0.5
    d1y = np.sin(t) * t + rng.uniform(0.0, 1.0, n) * 0.5
    sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)
    points = sign[:, None] * np.stack([d1x, d1y], axis=1) / 3.0
    return (points + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)


def pinwheel(n: int, seed: int = 0) -> np.ndarray:
    """Five curved arms (the pinwheel of Johnson et al., 2016)."""
    rng = np.random.default_rng(seed)
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = rng.integers(0, num_classes, n)
    angles = rads[labels] + rate * np.exp(features[:, 0])
    rotations = np.stack(
        [np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], axis=1
    ).reshape(-1, 2, 2)
    return (2.0 * np.einsum("ti,tij->tj", features, rotations)).astype(np.float32)


TOY_DATASETS: "dict[str, Callable[..., np.ndarray]]" = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "pinwheel": pinwheel,
}


def make_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """`n` points of the named 2-D toy dataset (see `TOY_DATASETS`)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(TOY_DATASETS)}.")
    if n < 1:
        raise ValueError(f"`n` must be >= 1; got {n}.")
    return TOY_DATASETS[name](n, seed)


def conditional_ring(n: int, seed: int = 0) -> "tuple[np.ndarray, np.ndarray]":
    """A conditional toy `p(x | c)`: `c ~ U(0.5, 2.5)`, `x` on a noisy ring of radius `c`.

    Returns `(x, c)` with shapes `[n, 2]` and `[n, 1]`. The true conditional
    density is known in closed form up to the angle: radius `c + 0.1 N(0, 1)`,
    angle uniform.
    """
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.5, 2.5, (n, 1))
    angle = rng.uniform(0.0, 2 * np.pi, n)
    radius = c[:, 0] + 0.1 * rng.standard_normal(n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x.astype(np.float32), c.astype(np.float32)


FUNNEL_SCALE = 3.0  # Standard deviation of the neck variable v (Neal, 2003).
SLCP_PRIOR_BOUND = 3.0  # SLCP's prior: theta ~ U(-3, 3)^5.


def funnel(n: int, seed: int = 0, dims: int = 6) -> np.ndarray:
    """Neal's funnel in `dims` dimensions: `v ~ N(0, 3^2)`, `x_i | v ~ N(0, exp(v))`.

    Returns `[n, dims]` with `v` in the last column, so the first layer of a
    flow sees the heavy-tailed scale mixtures `x_i` before the variable that
    sets their scale (a factor `exp(4.5)` either way across the data). The
    density is known: `funnel_log_prob`.
    """
    rng = np.random.default_rng(seed)
    v = FUNNEL_SCALE * rng.standard_normal(n)
    x = np.exp(v / 2.0)[:, None] * rng.standard_normal((n, dims - 1))
    return np.concatenate([x, v[:, None]], axis=1).astype(np.float32)


def funnel_log_prob(points: np.ndarray) -> np.ndarray:
    """The true log-density of `funnel` at `points` `[n, dims]` (float64)."""
    points = np.asarray(points, np.float64)
    x, v = points[:, :-1], points[:, -1]
    log_norm = -0.5 * np.log(2 * np.pi)
    lp_v = log_norm - np.log(FUNNEL_SCALE) - 0.5 * (v / FUNNEL_SCALE) ** 2
    lp_x = np.sum(log_norm - v[:, None] / 2.0 - 0.5 * x**2 * np.exp(-v)[:, None], axis=1)
    return lp_v + lp_x


def slcp_simulate(theta: np.ndarray, seed: "int | np.random.Generator" = 0) -> np.ndarray:
    """SLCP observations `x [n, 8]` for parameters `theta [n, 5]`.

    Four independent draws from a 2-D Gaussian with mean `(theta_1, theta_2)`,
    standard deviations `theta_3^2`, `theta_4^2` and correlation
    `tanh(theta_5)` (Papamakarios, Sterratt & Murray, 2019), laid out as
    `[x1_a, x2_a, x1_b, x2_b, ...]`.
    """
    theta = np.asarray(theta, np.float64)
    rng = np.random.default_rng(seed)
    n = theta.shape[0]
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, np.tanh(theta[:, 4])
    e1, e2 = rng.standard_normal((2, n, 4))
    x1 = theta[:, :1] + s1[:, None] * e1
    x2 = theta[:, 1:2] + s2[:, None] * (rho[:, None] * e1 + np.sqrt(1 - rho**2)[:, None] * e2)
    return np.stack([x1, x2], axis=2).reshape(n, 8).astype(np.float32)


def slcp(n: int, seed: int = 0) -> "tuple[np.ndarray, np.ndarray]":
    """Pairs of the SLCP simulator: `(theta [n, 5], x [n, 8])`, `theta ~ U(-3, 3)^5`.

    `x = slcp_simulate(theta)`. `x` alone is an 8-D density task; `theta`
    given `x` is a conditional one, whose posterior is multimodal (the signs
    of `theta_3`, `theta_4` are not identified) and lives on the prior's box.
    """
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-SLCP_PRIOR_BOUND, SLCP_PRIOR_BOUND, (n, 5))
    return theta.astype(np.float32), slcp_simulate(theta, seed=rng)


def shared_data_dir() -> "Path | None":
    """`../shared/data` beside the project root (or `$TFP_NAF_SHARED_DATA`), if present."""
    candidates = []
    if os.environ.get("TFP_NAF_SHARED_DATA"):
        candidates.append(Path(os.environ["TFP_NAF_SHARED_DATA"]))
    root = Path(__file__).resolve().parent.parent
    candidates += [root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


def load_shared_toy(name: str) -> "tuple[np.ndarray, np.ndarray] | None":
    """`(train [20000, 2], test [5000, 2])` of a 2-D set from `../shared/data/toys`, or None.

    These fixed arrays are the ones other libraries were measured on; when they
    are absent, generate data with `make_toy` instead.
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(TOY_DATASETS)}.")
    root = shared_data_dir()
    if root is None:
        return None
    train, test = root / "toys" / f"{name}_train.npy", root / "toys" / f"{name}_test.npy"
    if not (train.is_file() and test.is_file()):
        return None
    return np.load(train).astype(np.float32), np.load(test).astype(np.float32)


def miniboone_dir() -> "Path | None":
    """The MAF-preprocessed MiniBooNE folder, or None if it is not on this machine.

    Looks at `$TFP_NAF_MINIBOONE`, then `../shared/data/miniboone` beside the
    project root and the current directory.
    """
    candidates = []
    if os.environ.get("TFP_NAF_MINIBOONE"):
        candidates.append(Path(os.environ["TFP_NAF_MINIBOONE"]))
    root = Path(__file__).resolve().parent.parent
    candidates += [
        root.parent / "shared" / "data" / "miniboone",
        root / "shared" / "data" / "miniboone",
        Path.cwd().parent / "shared" / "data" / "miniboone",
    ]
    for path in candidates:
        if (path / "val.npy").is_file() and (path / "test.npy").is_file():
            return path
    return None


def load_miniboone() -> "tuple[np.ndarray, np.ndarray]":
    """`(val, test)` MiniBooNE splits as float32, `[3284, 43]` and `[3648, 43]`.

    Raises:
      FileNotFoundError: when the data is not on this machine (see
        `miniboone_dir`).
    """
    path = miniboone_dir()
    if path is None:
        raise FileNotFoundError(
            "MiniBooNE not found: set TFP_NAF_MINIBOONE to a folder holding val.npy "
            "and test.npy, or place it at ../shared/data/miniboone."
        )
    return (
        np.load(path / "val.npy").astype(np.float32),
        np.load(path / "test.npy").astype(np.float32),
    )
