"""A small zoo of fixed-point problems for the solver and implicit-differentiation tests.

Each problem is built from a few leaf tensors (``params``) by ``make_map(*params)``, which
returns the map ``z -> f(z)``; rebuilding the map from the same leaves gives a fresh graph,
so the same problem serves forward checks, implicit gradients and unrolled references.
Sizes are tiny on purpose (2 CPU cores shared by several people).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    """One fixed-point problem.

    Attributes:
        name: Identifier used in test ids.
        params: Leaf tensors the map depends on (weights, raw input).
        make_map: ``make_map(*params) -> f``.
        state_shape: Shape of the state ``[B, ...]``.
        nonnegative: A pcDEQ map (order preserving, maps the orthant into itself).
        exact: Closed-form fixed point for affine problems, else ``None``.
    """

    name: str
    params: tuple[torch.Tensor, ...]
    make_map: Callable[..., Map]
    state_shape: tuple[int, ...]
    nonnegative: bool
    exact: torch.Tensor | None = None

    def map(self) -> Map:
        return self.make_map(*self.params)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.state_shape)

    def reference(self, iterations: int = 600) -> torch.Tensor:
        """The fixed point: closed form, or a long plain iteration without a graph."""
        if self.exact is not None:
            return self.exact
        f = self.map()
        z = self.zeros()
        with torch.no_grad():
            for _ in range(iterations):
                z = f(z)
        return z

    def requires_grad_(self) -> Problem:
        for p in self.params:
            p.requires_grad_(True)
        return self


def _nonneg_matrix(n: int, rho: float, density: float = 1.0) -> torch.Tensor:
    w = torch.rand(n, n) * (torch.rand(n, n) < density)
    radius = torch.linalg.eigvals(w).abs().max().real
    return w * (rho / radius)


def dense_tanh(batch: int = 3, n: int = 6) -> Problem:
    """pcDEQ-1: tanh(W z + softplus_5(x)), W >= 0 with spectral radius 0.9."""
    w = _nonneg_matrix(n, 0.9)
    x = torch.randn(batch, n)

    def make_map(w: torch.Tensor, x: torch.Tensor) -> Map:
        u = F.softplus(x, beta=5)
        return lambda z: torch.tanh(z @ w.T + u)

    return Problem("dense_tanh", (w, x), make_map, (batch, n), nonnegative=True)


def dense_sigmoid(batch: int = 3, n: int = 6) -> Problem:
    """pcDEQ-2: sigmoid(W z + relu(x)), W >= 0 with spectral radius 2 (still a contraction)."""
    w = _nonneg_matrix(n, 2.0)
    x = torch.randn(batch, n)

    def make_map(w: torch.Tensor, x: torch.Tensor) -> Map:
        u = F.relu(x)
        return lambda z: torch.sigmoid(z @ w.T + u)

    return Problem("dense_sigmoid", (w, x), make_map, (batch, n), nonnegative=True)


def conv_tanh(batch: int = 2, channels: int = 3, size: int = 5) -> Problem:
    """pcDEQ-1 with a conv-shaped state [B, C, H, W] and a nonnegative 3x3 kernel."""
    kernel = torch.rand(channels, channels, 3, 3)
    kernel = kernel * (0.9 / kernel.sum(dim=(1, 2, 3)).max())  # row sums <= 0.9: contraction
    x = torch.randn(batch, channels, size, size)

    def make_map(kernel: torch.Tensor, x: torch.Tensor) -> Map:
        u = F.softplus(x, beta=5)
        return lambda z: torch.tanh(F.conv2d(z, kernel, padding=1) + u)

    return Problem(
        "conv_tanh", (kernel, x), make_map, (batch, channels, size, size), nonnegative=True
    )


def linear_contraction(batch: int = 3, n: int = 5) -> Problem:
    """Signed affine contraction z = A z + b, ||A||_2 = 0.8 (fixed point has mixed signs)."""
    a = torch.randn(n, n)
    a = a * (0.8 / torch.linalg.matrix_norm(a, ord=2))
    b = torch.randn(batch, n)
    exact = torch.linalg.solve(torch.eye(n) - a, b.T).T

    def make_map(a: torch.Tensor, b: torch.Tensor) -> Map:
        return lambda z: z @ a.T + b

    return Problem("linear_contraction", (a, b), make_map, (batch, n), False, exact)


def adjoint_like(batch: int = 3, n: int = 5) -> Problem:
    """The backward problem's shape: y = J^T y + g with J >= 0 (radius 0.9), g signed."""
    j = _nonneg_matrix(n, 0.9)
    g = torch.randn(batch, n)
    exact = torch.linalg.solve(torch.eye(n) - j.T, g.T).T

    def make_map(j: torch.Tensor, g: torch.Tensor) -> Map:
        return lambda y: y @ j + g

    return Problem("adjoint_like", (j, g), make_map, (batch, n), False, exact)


ZOO: dict[str, Callable[[], Problem]] = {
    "dense_tanh": dense_tanh,
    "dense_sigmoid": dense_sigmoid,
    "conv_tanh": conv_tanh,
    "linear_contraction": linear_contraction,
    "adjoint_like": adjoint_like,
}
PCDEQ_PROBLEMS = ("dense_tanh", "dense_sigmoid", "conv_tanh")


def slow_tanh_batch(injections: tuple[float, ...] = (0.5, 0.3, 1e-4)) -> tuple[Map, torch.Tensor]:
    """Scalar pcDEQ-1 maps z = tanh(z + x) per sample; a tiny x makes a very slow sample.

    The local rate is ~0.63 at x = 0.1 and ~0.9955 at x = 1e-4 (pcdeq.md section 1.7).
    """
    x = torch.tensor(injections).unsqueeze(1)
    return (lambda z: torch.tanh(z + x)), torch.zeros(len(injections), 1)


def batched_small_maps(batch: int = 64, n: int = 4, seed: int = 0) -> tuple[Map, torch.Tensor]:
    """Independent tiny pcDEQ-1 maps, one per sample, started at random nonnegative points.

    Sparse W >= 0 and near-zero injections put some fixed-point coordinates close to 0,
    where unguarded Anderson extrapolation steps below zero.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, n, n, generator=gen) * (torch.rand(batch, n, n, generator=gen) < 0.5)
    radius = torch.linalg.eigvals(w).abs().max(dim=1).values.real.clamp_min(1e-9)
    w = w / radius.view(-1, 1, 1) * (1.5 * torch.rand(batch, 1, 1, generator=gen))
    u = torch.rand(batch, n, generator=gen) ** 4 * 0.5
    z0 = torch.rand(batch, n, generator=gen) * 3

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.bmm(w, z.unsqueeze(2)).squeeze(2) + u)

    return f, z0
