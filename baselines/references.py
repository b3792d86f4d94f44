"""Reference rows that need no training, scored by exactly the same protocol as every generator (issues #14/#15).

A number in Tables 2-4 means something only beside what trivial answers score on the same data:

- ``real``: random real TRAINING volumes, unconditional. Its FID (at the suite's ``eval.n_generated``) is the
  real-vs-real floor at the same n as every generated set; its SSIM/LPIPS pair each test subject with the nearest
  training volume in feature space (the pairing every unconditional method gets). No generator can be expected
  to score below this row.
- ``train_copy``: a perfect memoriser that follows the request: for a clinical vector c it returns the training
  subject whose (standardised) clinical vector is nearest to c. The FID, BAC and volumetric consistency a
  generator reaches by copying its training data; ``nn_ratio`` flags it.
- ``mean_volume``: the voxel-wise mean of the training split for every request (conditional in name only, so the
  clinical columns show what ignoring the request scores: BAC 50 %).
- ``medoid``: the training subject nearest to the training mean (:func:`models.template.nearest_to_mean`) for every
  request: one sharp real brain, the template quick's VAE-GAN rows warp (``model.template``). What a generator
  scores beyond it is what it learned beyond its template; at quick it alone scores FID 5.91 against the mean
  volume's 9.91 (DESIGN §9 "A sharp template").
- ``mean_noise`` (not a default row; add it with ``--methods +mean_noise``): the mean volume plus white noise inside
  the brain, with the SD that gives it the training volumes' high-frequency energy. It has no anatomy beyond the
  mean, so what it gains over ``mean_volume`` on a metric is what texture alone buys there (DESIGN §9 "What the FID
  network's blocks measure": at quick FID 9.91 -> 3.55, FID (anat.) only 0.85 -> 0.66).

They are registered like methods so that the runner, the suites and the report treat them as rows; the runner sees
``needs_training = False``, skips the training loop and calls :meth:`ReferenceMethod.fit` with the data bundle.
The training volumes are held as plain attributes, not buffers: checkpoints and ``weights.pt`` stay empty, and
loading one calls ``fit`` again (a pure function of the data and split).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import Config
from benchmark.registry import METHODS
from metrics.triplanar import brain_mask
from models.base import GenerativeMethod
from models.template import nearest_to_mean

REFERENCE_METHODS = ("real", "train_copy", "mean_volume", "medoid", "mean_noise")


class ReferenceMethod(GenerativeMethod):
    """Base of the training-free rows: ``fit(bundle)`` once, then ``sample`` like any method."""

    needs_training = False

    def __init__(self, cfg: Config, heads: object | None = None) -> None:
        super().__init__(cfg)
        # One parameter-free module so that `next(method.parameters(), ...)`-style device queries and `.to()` work.
        self.G = nn.Identity()
        self._x: Tensor | None = None
        self._c: Tensor | None = None

    def fit(self, bundle: Any) -> ReferenceMethod:
        """Read the training split (volumes [N,1,S,S,S], standardised clinical vectors [N,7])."""
        self._x, self._c = bundle.tensors("train")
        return self

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def training_step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        return {}

    def param_groups(self) -> dict[str, nn.Module]:
        return {}

    @property
    def train_volumes(self) -> Tensor:
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(bundle) before sampling")
        return self._x


@METHODS.register("real")
class RealVolumes(ReferenceMethod):
    """Random real training volumes (without replacement while they last): the real-vs-real floor row."""

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        x = self.train_volumes
        reps = -(-n // len(x))
        idx = torch.cat([torch.randperm(len(x), generator=generator) for _ in range(reps)])[:n]
        return x[idx].clone()


@METHODS.register("train_copy")
class TrainCopy(ReferenceMethod):
    """For each requested clinical vector, the training subject whose vector is nearest: a perfect memoriser."""

    conditional = True

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        if c is None:
            raise ValueError("train_copy is conditional: pass clinical vectors c [n, 7]")
        x, train_c = self.train_volumes, self._c
        assert train_c is not None
        # The label must match exactly (it is a category); ties in the ratios are broken by the lower index.
        dist = torch.cdist(c[:, :6].double().cpu(), train_c[:, :6].double())
        dist = dist + 1e6 * (c[:, 6:7].cpu().round() != train_c[:, 6].round()[None]).double()
        return x[dist.argmin(dim=1)].clone()


@METHODS.register("mean_volume")
class MeanVolume(ReferenceMethod):
    """The voxel-wise mean training volume for every request."""

    conditional = True

    def fit(self, bundle: Any) -> MeanVolume:
        super().fit(bundle)
        self._mean = self.train_volumes.mean(dim=0, keepdim=True)
        return self

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return self._mean.expand(n, -1, -1, -1, -1).clone()


@METHODS.register("medoid")
class Medoid(ReferenceMethod):
    """The training subject nearest to the training mean (the quick preset's template) for every request."""

    conditional = True

    def fit(self, bundle: Any) -> Medoid:
        super().fit(bundle)
        self._medoid = nearest_to_mean(self.train_volumes)  # the split is in memory already: no second read
        return self

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return self._medoid.expand(n, -1, -1, -1, -1).clone()


def high_pass_variance(x: Tensor, mask: Tensor) -> Tensor:
    """Per volume, the variance inside ``mask`` [1,1,S,S,S] of x [N,1,S,S,S] minus its 3^3 local mean: the volume's
    high-frequency energy (edges, texture, noise)."""
    local = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    residual = (x - local)[:, :, mask[0, 0]]
    return residual.var(dim=-1).squeeze(1)


@METHODS.register("mean_noise")
class MeanPlusNoise(MeanVolume):
    """The mean training volume plus white noise in the brain, as textured as the training volumes: a texture-only
    reference (what a metric rewards for high-frequency energy without anatomy).

    The brain is where any training volume is not background (:func:`metrics.triplanar.brain_mask`: each volume's
    own background, the z-score of intensity 0, differs from volume to volume); the noise SD solves
    hp(mean) + sd^2 (1 - 1/27) = mean over volumes of hp(x), hp = :func:`high_pass_variance` (a 3^3 box removes
    1/27 of white noise's variance).
    """

    def fit(self, bundle: Any) -> MeanPlusNoise:
        super().fit(bundle)
        x = self.train_volumes
        self._brain = torch.stack([brain_mask(v) for v in x]).any(dim=0)[None, None]
        target = high_pass_variance(x, self._brain).mean()
        own = high_pass_variance(self._mean, self._brain)[0]
        self.noise_sd = float(((target - own).clamp_min(0) / (1 - 1 / 27)).sqrt())
        return self

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn((n, *self._mean.shape[1:]), generator=generator) * self.noise_sd
        return self._mean + noise * self._brain
