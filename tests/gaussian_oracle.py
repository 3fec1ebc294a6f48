"""Data x_0 ~ N(mu, Sigma): the optimal noise predictor is known in closed form.

x_t = a x_0 + s eps with a^2 = abar_t, s^2 = 1 - abar_t, so x_t ~ N(a mu, C_t), C_t = a^2 Sigma + s^2 I,
and E[eps | x_t] = s C_t^{-1} (x_t - a mu): the minimiser of the noise-prediction loss.
"""
import torch

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
# eigenvalues ~0.29 and ~0.02: the narrow direction makes leftover noise and bad step sizes visible
SIGMA = torch.tensor([[0.25, 0.1], [0.1, 0.06]], dtype=torch.float64)


def marginal_cov(abar: torch.Tensor, sigma: torch.Tensor = SIGMA) -> torch.Tensor:
    a = abar.view(-1, 1, 1)
    return a * sigma + (1 - a) * torch.eye(sigma.shape[0], dtype=sigma.dtype)


def optimal_eps(abar_table: torch.Tensor, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA):
    """Denoiser(x, t) -> E[eps | x_t = x] for the schedule whose alpha-bar table is given."""
    def denoiser(x, t):
        abar = abar_table[t].to(x.dtype)
        cov = marginal_cov(abar, sigma)
        resid = x - abar.sqrt()[:, None] * mu
        return (1 - abar).sqrt()[:, None] * torch.linalg.solve(cov, resid.unsqueeze(-1)).squeeze(-1)
    return denoiser


def moment_errors(x: torch.Tensor, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA) -> tuple[float, float]:
    """(max |mean error|, max |whitened covariance - I|): scale-free, so the narrow direction counts."""
    chol_inv = torch.linalg.inv(torch.linalg.cholesky(sigma))
    whitened = chol_inv @ torch.cov(x.T) @ chol_inv.T
    return (x.mean(0) - mu).abs().max().item(), (whitened - torch.eye(len(mu), dtype=x.dtype)).abs().max().item()


def exact_moment_errors(sampler, mu: torch.Tensor = MU, sigma: torch.Tensor = SIGMA) -> tuple[float, float]:
    """moment_errors of the exact output distribution of `sampler(x_T)`, for a deterministic sampler driven
    by optimal_eps: every step is affine in x, so out = b + A x_T and, with x_T ~ N(0, I), the output is
    N(b, A A^T). Three runs (x_T = 0, e_1, e_2) give it with no Monte Carlo noise floor."""
    basis = torch.cat([torch.zeros(1, len(mu)), torch.eye(len(mu))]).to(mu.dtype)
    out = sampler(basis)
    b, a = out[0], (out[1:] - out[0]).T
    chol_inv = torch.linalg.inv(torch.linalg.cholesky(sigma))
    whitened = chol_inv @ a @ a.T @ chol_inv.T
    return (b - mu).abs().max().item(), (whitened - torch.eye(len(mu), dtype=mu.dtype)).abs().max().item()
