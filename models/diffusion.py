"""DDPM prior over the 7-D clinical vector (paper §2.4 "Diffusion Model", Algorithm 2, Fig. 1-B).

Ho et al. (2020) on c = [6 standardised ROI ratios, label]. Choices the paper leaves open, fixed here (numbers:
the synthetic CN/AD table of ``tests/test_diffusion.py``, 3000 steps, 1000 samples, C2ST accuracy, 0.5 = ideal):

- Label coordinate: represented as ``2 * label - 1`` (+-1) in diffusion space, so it has the scale of the
  standardised ratios (paper: 0/1); sampled labels are thresholded at 0 and returned as 0/1 again.
- Schedule: linear, beta 1e-4..0.02 (Ho et al.), T = 500. It sampled as well as the cosine schedule (Nichol &
  Dhariwal 2021) with ancestral DDPM (C2ST 0.52-0.55 vs 0.51-0.53 over two seeds) and clearly better with DDIM at
  50 steps (0.51-0.52 vs 0.57-0.60): the cosine schedule's betas near 0.999 at the noisy end make DDIM's few large
  steps error-prone. Cut to T = 500 the linear schedule ends at sqrt(alpha_bar_T) = 0.08, not 0; rescaling the
  betas by 1000/T (2e-4..0.04, ending at 0.006) measured no better, so Ho's values stay.
- Noise predictor: three linear layers with SiLU on [x_t, observation mask, sinusoidal emb(t)] (concatenated).
  Because the embedding enters the first layer only, ``W_t emb(t) + b`` is a per-step bias that sampling
  precomputes for all T steps, leaving three small matmuls per step.
- Hidden width 128 (brief: "e.g. 256"): the middle layer costs 2 * n * H^2 FLOP per step, 65 GFLOP for 1000
  vectors x 500 steps at H = 256. Measured here (2 threads, median of 7): H = 128 takes 0.23 s (0.43-0.47 s with
  OMP_WAIT_POLICY=PASSIVE, 0.41 s on 1 thread), H = 256 takes 0.53-0.61 s, over the 0.5 s target. DDIM at 50
  steps: 0.02-0.04 s.
- Fixed coordinates (paper Algorithm 3 "manual mode", fixed label): the known coordinates are replaced by their
  values at every step, as in inpainting, and the network is trained to read them: a fraction ``cond_rate`` of
  training rows observe a random subset of coordinates, clean, flagged by the mask input, and the loss covers the
  other coordinates. Plain replacement with q(x_t | x_0 = known) draws into a joint-only model, the textbook
  recipe, barely conditions a binary label: the label is decided at high noise, where its noised value carries
  almost no signal. Measured (mean standardised left-ventricle ratio of label-fixed samples, real CN -0.42 / AD
  0.36): plain replacement -0.05 / 0.16 (C2ST against the real class 0.56-0.59); trained observation -0.18 / 0.15
  after 3000 steps (C2ST 0.54 / 0.53) and -0.25 / 0.24 after 20000 (C2ST 0.50 / 0.48): the conditionals sharpen
  with training, the joint is unaffected (mask-free rows are half of training). Fixed coordinates come back
  exactly at the given values.
- Sampling: one loop for both samplers, DDIM's update with eta = 1 (ancestral DDPM with posterior variance
  beta-tilde, on any evenly spaced sub-sequence of steps) or eta = 0 (deterministic DDIM). The predicted x_0 is
  clipped to 1.25 x the training data's range per coordinate (``x0_bound``, set by :func:`fit_prior`), which keeps
  the noisiest steps from amplifying noise-prediction errors.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmark.data.contract import CLINICAL_DIM, LABEL_INDEX

Fixed = dict[int, float] | tuple[Tensor, Tensor]

# Rows sampled per chunk: bounds the pre-drawn noise ([steps, rows, 7] twice) to ~110 MB.
_SAMPLE_CHUNK = 8192


def cosine_alpha_bar(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cumulative products alpha_bar_t, t = 1..T, of Nichol & Dhariwal's cosine schedule (float64, [T])."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def linear_alpha_bar(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Cumulative products alpha_bar_t of Ho et al.'s linear schedule (float64, [T])."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64), dim=0)


def sinusoidal_embedding(timesteps: int, dim: int) -> Tensor:
    """Transformer-style embedding of t = 0..T-1: [T, dim] = [sin(t f_k), cos(t f_k)], f_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(timesteps, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class NoisePredictor(nn.Module):
    """eps_theta(x_t, m, t): a three-layer SiLU MLP on [x_t, m, emb(t)] (paper: "a three-layer MLP").

    ``m`` [N, dim] is 1 where a coordinate is observed (its clean value then sits in x_t), 0 where it is diffused.
    """

    def __init__(self, dim: int, hidden: int, time_dim: int, timesteps: int) -> None:
        super().__init__()
        self.register_buffer("time_table", sinusoidal_embedding(timesteps, time_dim), persistent=False)
        self.fc1 = nn.Linear(2 * dim + time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)
        for layer in (self.fc1, self.fc2, self.fc3):  # paper §2.5: Xavier uniform everywhere
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        """x: [N, dim] noisy (clean where observed), mask: [N, dim] 0/1, t: [N] steps in [0, T) -> noise [N, dim]."""
        h = F.silu(self.fc1(torch.cat([x, mask, self.time_table[t]], dim=1)))
        return self.fc3(F.silu(self.fc2(h)))

    def step_biases(self) -> Tensor:
        """[T, hidden]: fc1's time-embedding part plus its bias, for every step (sampling precomputes it)."""
        dim = self.fc3.out_features
        return torch.addmm(self.fc1.bias, self.time_table, self.fc1.weight[:, 2 * dim :].t())


class ClinicalDDPM(nn.Module):
    """DDPM over clinical vectors c = [6 standardised ratios, label 0/1] (see the module docstring for choices).

    Args:
        dim: vector length (7).
        label_index: the binary coordinate (6), or None when there is none.
        hidden: width of the noise predictor's hidden layers.
        time_dim: width of the sinusoidal timestep embedding.
        timesteps: T (paper §3.5: 500 sampling steps).
        schedule: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal).
        cond_rate: fraction of training rows that observe a random subset of coordinates (for ``fixed``).
    """

    def __init__(
        self,
        dim: int = CLINICAL_DIM,
        *,
        label_index: int | None = LABEL_INDEX,
        hidden: int = 128,
        time_dim: int = 64,
        timesteps: int = 500,
        schedule: str = "linear",
        cond_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        self.dim, self.label_index, self.timesteps, self.schedule = dim, label_index, timesteps, schedule
        self.cond_rate = cond_rate
        self.net = NoisePredictor(dim, hidden, time_dim, timesteps)
        alpha_bar = cosine_alpha_bar(timesteps) if schedule == "cosine" else linear_alpha_bar(timesteps)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)  # float64: sampling coefficients
        # |x_0| bound in diffusion space for clipping predicted x_0; inf until fit_prior sets it from the data.
        self.register_buffer("x0_bound", torch.full((dim,), math.inf))

    # --- contract space <-> diffusion space ---------------------------------------------------------------
    def to_diffusion(self, c: Tensor) -> Tensor:
        """[N, dim] contract vectors (label 0/1) -> diffusion space (label +-1)."""
        x = c.to(torch.float32).clone()
        if self.label_index is not None:
            x[:, self.label_index] = 2 * x[:, self.label_index] - 1
        return x

    def from_diffusion(self, x: Tensor) -> Tensor:
        """[N, dim] diffusion-space vectors -> contract vectors, label thresholded at 0 to 0/1."""
        c = x.clone()
        if self.label_index is not None:
            c[:, self.label_index] = (x[:, self.label_index] > 0).to(c.dtype)
        return c

    # --- training (Algorithm 2) ----------------------------------------------------------------------------
    def loss(self, c0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise-prediction MSE at uniformly random steps (Ho et al. L_simple), on the unobserved coordinates.

        A fraction ``cond_rate`` of the rows observe a random subset of coordinates (each with probability
        r ~ U(0, 1)), clean and flagged in the mask input; the rest observe none (the joint model).

        Args:
            c0: [N, dim] clinical vectors, ratios standardised, label 0/1.
        Returns:
            scalar loss.
        """
        x0 = self.to_diffusion(c0)
        n, dev = x0.shape[0], x0.device
        t = torch.randint(0, self.timesteps, (n,), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, generator=generator)
        rate = torch.rand(n, 1, device=dev, generator=generator)
        rate = rate * (torch.rand(n, 1, device=dev, generator=generator) < self.cond_rate)
        mask = torch.rand(x0.shape, device=dev, generator=generator) < rate
        ab = self.alpha_bar[t].to(torch.float32)[:, None]
        xt = torch.where(mask, x0, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
        free = (~mask).to(x0.dtype)
        err = (self.net(xt, mask.to(x0.dtype), t) - noise).square()
        return (err * free).sum() / free.sum().clamp(min=1.0)

    # --- sampling ------------------------------------------------------------------------------------------
    def _known(self, n: int, fixed: Fixed | None, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """Fixed coordinates as (mask [n, dim] bool, values [n, dim] in diffusion space), or None."""
        if fixed is None:
            return None
        if isinstance(fixed, dict):
            mask = torch.zeros(self.dim, dtype=torch.bool)
            values = torch.zeros(self.dim)
            for i, v in fixed.items():
                mask[i], values[i] = True, float(v)
        else:
            mask, values = fixed
            mask, values = mask.to(torch.bool).cpu(), values.to(torch.float32).cpu()
        mask, values = mask.expand(n, self.dim), values.expand(n, self.dim)
        li = self.label_index
        if li is not None and mask[:, li].any():
            lab = values[:, li][mask[:, li]]
            if not torch.all((lab == 0) | (lab == 1)):
                raise ValueError("a fixed label must be 0 (CN) or 1 (AD)")
        values = self.to_diffusion(values)
        return mask.to(device), values.to(device)

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        *,
        fixed: Fixed | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        sampler: str = "ddpm",
    ) -> Tensor:
        """Draw n clinical vectors, all coordinates jointly or with some fixed (inpainting by replacement).

        Args:
            n: number of vectors.
            fixed: ``{index: value}`` or ``(mask, values)``, mask (bool) and values broadcastable to [n, dim], so
                each row may fix its own set; values in contract units (standardised ratios, label 0/1). Fixed
                coordinates come back exactly as given.
            generator: torch.Generator for reproducible draws (on the model's device).
            steps: number of reverse steps on an evenly spaced sub-sequence of the T steps; default T for
                ``ddpm``, 50 for ``ddim``.
            sampler: ``ddpm`` (ancestral, eta = 1) or ``ddim`` (deterministic, eta = 0).
        Returns:
            [n, dim] float32, ratios standardised, label 0/1.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        steps = steps or (self.timesteps if sampler == "ddpm" else 50)
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        dev = self.x0_bound.device
        known = self._known(n, fixed, dev)
        chunks = []
        for start in range(0, n, _SAMPLE_CHUNK):
            rows = slice(start, min(n, start + _SAMPLE_CHUNK))
            k = None if known is None else (known[0][rows], known[1][rows])
            chunks.append(self._sample_chunk(rows.stop - rows.start, k, generator, steps, sampler == "ddpm"))
        out = torch.cat(chunks) if chunks else torch.zeros(0, self.dim, device=dev)
        return self.from_diffusion(out)

    def _sample_chunk(
        self, n: int, known: tuple[Tensor, Tensor] | None, generator: torch.Generator | None, steps: int, eta1: bool
    ) -> Tensor:
        """The reverse loop for up to _SAMPLE_CHUNK rows; returns [n, dim] in diffusion space."""
        net, dev, d = self.net, self.x0_bound.device, self.dim
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        ab = self.alpha_bar.cpu()
        # Per-step scalar coefficients as Python floats: no tensor indexing inside the loop.
        coefs = []
        for i, t in enumerate(ts):
            ab_t = float(ab[t])
            ab_prev = float(ab[ts[i + 1]]) if i + 1 < steps else 1.0
            var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev) if eta1 else 0.0
            coefs.append(
                (
                    t,
                    1 / math.sqrt(ab_t),
                    math.sqrt(1 / ab_t - 1),
                    math.sqrt(ab_t),
                    1 / math.sqrt(1 - ab_t),
                    math.sqrt(ab_prev),
                    math.sqrt(max(1 - ab_prev - var, 0.0)),
                    math.sqrt(var),
                )
            )
        w1 = net.fc1.weight[:, :d].t().contiguous()
        w2, w3 = net.fc2.weight.t().contiguous(), net.fc3.weight.t().contiguous()
        b2, b3, biases = net.fc2.bias, net.fc3.bias, net.step_biases()
        lo, hi = -self.x0_bound, self.x0_bound
        noise = torch.randn((steps + 1, n, d), device=dev, generator=generator)
        x = noise[steps]
        mask_term = None
        if known is not None:
            mask, values = known
            mask_term = mask.to(w1.dtype) @ net.fc1.weight[:, d : 2 * d].t()  # [n, hidden], constant over steps
            x = torch.where(mask, values, x)
        h1 = torch.empty(n, w1.shape[1], device=dev)
        h2 = torch.empty_like(h1)
        for i, (t, r_ab, r_ab1, s_ab, r_1ab, s_prev, c_eps, sigma) in enumerate(coefs):
            torch.addmm(biases[t], x, w1, out=h1)
            if mask_term is not None:
                h1.add_(mask_term)
            F.silu(h1, inplace=True)
            F.silu(torch.addmm(b2, h1, w2, out=h2), inplace=True)
            eps = torch.addmm(b3, h2, w3)
            x0 = torch.clamp(x * r_ab - eps * r_ab1, lo, hi)
            eps = (x - x0 * s_ab).mul_(r_1ab)  # consistent with the clipped x_0
            x = x0.mul_(s_prev).add_(eps, alpha=c_eps)
            if sigma > 0:
                x.add_(noise[i], alpha=sigma)
            if known is not None:
                x = torch.where(mask, values, x)
        return x


def fit_prior(
    ddpm: ClinicalDDPM,
    c_train: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 5e-4,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    ema_decay: float = 0.999,
    log_every: int = 100,
) -> dict[str, list[float]]:
    """Train ``ddpm`` on clinical vectors (Algorithm 2); afterwards it holds the EMA weights.

    Adam with the paper's betas (0.5, 0.999), lr 5e-4 and gradient clipping 1.0 (§2.5). The EMA of the weights
    (decay ``ema_decay`` per step) averages out the noise of single-batch steps, which the fine correlations
    between ratios are sensitive to; the paper's ReduceLROnPlateau is not used, since the loss of a random-t
    objective is too noisy to show a plateau within a few thousand steps.

    Args:
        ddpm: the model (its device is used).
        c_train: [N, dim] training vectors, ratios standardised, label 0/1.
        steps: optimizer steps.
        batch_size: vectors per step, drawn with replacement.
        seed: seeds batch draws, timesteps and noise (a torch.Generator; global RNG untouched).
        log_every: steps per history entry.
    Returns:
        {'step': [...], 'loss': [...]} with the mean training loss over each ``log_every`` steps.
    """
    dev = ddpm.x0_bound.device
    data = c_train.to(dev, torch.float32)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        ddpm.x0_bound.copy_(ddpm.to_diffusion(data).abs().amax(dim=0) * 1.25)
    ema = copy.deepcopy(ddpm.net).requires_grad_(False)
    opt = torch.optim.Adam(ddpm.net.parameters(), lr=lr, betas=(0.5, 0.999))
    history: dict[str, list[float]] = {"step": [], "loss": []}
    running, count = 0.0, 0
    ddpm.train()
    bar = tqdm(range(1, steps + 1), desc="diffusion prior", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), device=dev, generator=gen)
        loss = ddpm.loss(data[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(ddpm.net.parameters(), grad_clip)
        opt.step()
        with torch.no_grad():
            # Warm-up (as in timm/Karras): early EMA steps must not drag the random initialisation along.
            weight = 1 - min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), ddpm.net.parameters(), strict=True):
                p_ema.lerp_(p, weight)
        running, count = running + loss.item(), count + 1
        if step % log_every == 0 or step == steps:
            history["step"].append(step)
            history["loss"].append(running / count)
            bar.set_postfix(loss=f"{running / count:.4f}")
            running, count = 0.0, 0
    ddpm.net.load_state_dict(ema.state_dict())
    ddpm.eval()
    return history
