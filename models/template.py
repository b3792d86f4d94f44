"""The template a deformable-template decoder warps: which training volume it is (``model.template``).

A decoder that outputs ``warp(template) + residual`` can only be as sharp as its template. The voxel-wise mean of
the training volumes is a blurred brain: the subjects' cortices, ventricles and grey/white boundaries sit at
different places, so averaging them smooths every edge (at quick its high-pass energy inside the brain is 0.27,
a subject's 0.58), and warping a blurred template gives blurred samples that score no better than the mean volume
on FID (DESIGN §9 "A sharp template"). The medoid, the training subject nearest to the mean, is a real brain with
every edge in place and the least displacement to reach the others: the classic choice of a first atlas.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def nearest_to_mean(volumes: Tensor) -> Tensor:
    """[1, 1, S, S, S]: the volume of ``volumes`` [N, 1, S, S, S] with the least mean absolute difference to their
    voxel-wise mean (the first on ties; in float64, as :func:`medoid_volume`)."""
    v = volumes.double()
    distance = (v - v.mean(dim=0, keepdim=True)).abs().flatten(1).mean(dim=1)
    return volumes[int(distance.argmin())].unsqueeze(0).clone()


def medoid_volume(dataset: Sequence[dict[str, Any]], chunk: int = 64) -> Tensor:
    """:func:`nearest_to_mean` over a dataset of ``{"x": [1, S, S, S]}`` items, in two streaming passes (the
    mean, then each volume's distance to it), so a 128^3 training split never has to fit in memory at once."""
    n = len(dataset)
    if n == 0:
        raise ValueError("medoid_volume: the training split is empty")

    def chunks() -> Iterator[tuple[int, Tensor]]:
        for start in range(0, n, chunk):
            yield start, torch.stack([dataset[i]["x"] for i in range(start, min(n, start + chunk))]).double()

    mean = sum(batch.sum(0) for _, batch in chunks()) / n
    best, best_index = float("inf"), 0
    for start, batch in chunks():
        distance = (batch - mean).abs().flatten(1).mean(dim=1)
        i = int(distance.argmin())
        if float(distance[i]) < best:
            best, best_index = float(distance[i]), start + i
    return dataset[best_index]["x"].float().unsqueeze(0).clone()


class OutputTemplate(nn.Module):
    """``x + template``: a generator's output as a residual on a fixed training volume (the medoid).

    The baselines' option (``wgan.output_template``, ``stylegan.output_template``) that gives them the data prior
    the quick preset gives the VAE-GAN rows (``model.template``), so that Table 3 compares what each method learns on
    top of the same template within the same short budget. The template is a buffer, so checkpoints carry it.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("template", torch.zeros(1, 1, size, size, size))
        self.register_buffer("count", torch.zeros(()))

    @property
    def is_set(self) -> bool:
        return float(self.count) > 0

    @torch.no_grad()
    def set(self, volume: Tensor) -> None:
        self.template.copy_(volume.reshape(self.template.shape))
        self.count.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.template.to(x.dtype)
