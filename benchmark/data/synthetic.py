"""The embedded synthetic CN/AD cohort: real anatomy (MNI152 2009), known structure volumes (DESIGN §4).

ADNI cannot be shipped, so `make run` and the tests use this cohort. It is written in the same folder format as a
prepared real cohort (`clinical.csv` in ratios form + a `label_map` column, `images/*.nii` float32 z-scored inside the
brain, `labels/*.nii` uint8, and a `cohort.json` sidecar).

Anatomy. The ICBM152 2009a nonlinear symmetric T1 template, its grey-matter map and brain mask, as shipped inside the
nilearn wheel (`nilearn.datasets.load_mni152_*`, offline). Structure masks follow the template-only recipe of
ROI-STATISTICS.md §5: lateral ventricles = dark T1 (< 0.45) in a box, largest connected component per hemisphere;
hippocampus and amygdala = GM > 0.6 inside ellipsoids placed at their FreeSurfer-aseg / Harvard-Oxford / AAL
centroids. Label values: 0 background, 1..6 = `ROI_NAMES` in order, 7 = other brain tissue, 8 = other CSF.
Whole-brain volume = tissue labels {1, 2, 3, 4, 7}: brain without ventricles and CSF, as FreeSurfer `WholeBrain`.

Clinical ratios. One multivariate log-normal per diagnosis over the six ratios, with the parameters recommended in
ROI-STATISTICS.md §3 (whose volume means/SDs are FreeSurfer/ADNI consensus estimates, checked there against:
PMC10739621 Table 1 for the hippocampus; Klein-Koerkamp et al. 2014, Curr Alzheimer Res 11:239, and Poulin et al.
2011, Psychiatry Res Neuroimaging 194:7, for the amygdala; Fonov et al., lateral ventricle size in ADNI, for the
ventricles; Pedraza et al. 2004, JINS 10:664, for the R > L asymmetry). The within-group L/R and cross-structure
correlations are estimates there too, to be rechecked on real data. Truncated at ±4 SD. The CN and AD distributions
overlap as in ADNI (a linear discriminant on the six log-ratios reaches AUC ≈ 0.85), so AD vs CN is learnable but
not trivial. Half the subjects are AD.

Subject model. Each subject is the template under
(1) a local inflation/deflation flow per structure: a stationary velocity field whose divergence is β_k inside
    structure k, balanced by a tissue sink concentrated around the ventricles (they enlarge ex vacuo, into
    periventricular tissue, and do not shove the medial temporal lobe aside). Integrated by scaling and squaring, it
    stays a diffeomorphism even at 30x ventricle growth, and a thin C-shaped ventricle widens on both walls instead
    of being scaled about its centroid. β_k comes from the flow's measured response (once per process), then one
    correction from the volumes actually reached in subject space;
(2) a smooth random global deformation (5³ control points, 2 mm) and a small random affine;
(3) mild global atrophy: a share of the outermost 1 mm of cortex becomes sulcal CSF (more in AD, overlapping);
(4) reduced grey/white-matter contrast: grey matter brightens towards white matter by a subject fraction of their
    difference (more in AD, overlapping), the T1 contrast loss of Salat et al. 2011 (NeuroImage 54:1795, GWC
    reduced in AD and tied to hippocampal degeneration);
(5) a smooth multiplicative bias field (±3 %), a random gamma and Rician noise.
The template is edited so that the image shows what the label map says: a white-matter collar around hippocampus
and amygdala and a thin white septum between them (the recipe's ellipsoids cut through continuous grey matter,
which would make their volumes invisible). Each structure's label volume / whole-brain volume approximately equals
the sampled ratio (typically within a few %); the CSV then holds the ratio measured on the written label map, so it
is exact by construction. Images are z-scored inside the brain; the background holds the z-score of intensity 0
(see `benchmark.data.preprocess.zscore_in_mask`).

Speed (PERFORMANCE.md): the template is loaded, labelled and its flow basis computed once per process (~4 s), and
prefiltered once per size; all per-subject fields live on a 40³ grid (~5 mm) and are upsampled separably; each
output array is one `map_coordinates` call. About 0.25-0.3 s of CPU per subject at 64³. Subjects are seeded from
`SeedSequence(seed, spawn_key=(0, i))`, so a cohort does not depend on the worker count, and a subject's anatomy does
not depend on the output size.

Volumetry: `measure_roi_ratios` estimates the six ratios from images alone (known intensity classes in fixed
MNI-space regions), for the volumetric consistency of generated volumes; it is meant for S >= 64.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.fft
from scipy import ndimage

from benchmark.data.contract import DIAGNOSES, N_ROI, ROI_NAMES
from benchmark.data.errors import DataError
from benchmark.data.preprocess import cube_affine, cube_box, save_nifti_atomic, zscore_in_mask

GENERATOR_VERSION = "3"
LABEL_TISSUE = N_ROI + 1  # 7
LABEL_CSF = N_ROI + 2  # 8
WHOLE_BRAIN_LABELS = (1, 2, 3, 4, LABEL_TISSUE)  # hippocampi, amygdalae, other tissue
COARSE = 40  # per-subject fields live on a COARSE³ grid spanning the cube (≈ 5 mm)
# Rates at which the flow's response (structure volume / template volume) is measured once per process; a subject's
# rates are interpolated from it. Ventricle targets reach ~30x the young-adult template's ventricles.
_RESPONSE_BETA = {
    "hippocampus": (-1.6, -0.9, -0.4, 0.0, 0.5, 1.1, 2.0, 3.3),
    "lateral_ventricle": (-1.2, -0.5, 0.0, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 70.0),
}
_BOX_MARGIN_MM = {"hippocampus": 12.0, "amygdala": 12.0, "lateral_ventricle": 24.0}
_BOX_STEP_MM = {"hippocampus": 1.5, "amygdala": 1.5, "lateral_ventricle": 2.0}

# ROI-STATISTICS.md §3: log ratio-to-whole-brain ~ N(mu, diag(sigma) R diag(sigma)), order = ROI_NAMES.
LOG_MU = {
    "CN": np.array([-5.663, -5.637, -6.541, -6.494, -4.202, -4.300]),
    "AD": np.array([-5.850, -5.796, -6.745, -6.688, -3.782, -3.875]),
}
LOG_SIGMA = {
    "CN": np.array([0.125, 0.125, 0.150, 0.149, 0.504, 0.519]),
    "AD": np.array([0.167, 0.164, 0.198, 0.195, 0.444, 0.460]),
}
LOG_CORR = np.array(
    [
        [1.00, 0.85, 0.65, 0.60, -0.35, -0.30],
        [0.85, 1.00, 0.60, 0.65, -0.30, -0.35],
        [0.65, 0.60, 1.00, 0.75, -0.30, -0.25],
        [0.60, 0.65, 0.75, 1.00, -0.25, -0.30],
        [-0.35, -0.30, -0.30, -0.25, 1.00, 0.90],
        [-0.30, -0.35, -0.25, -0.30, 0.90, 1.00],
    ]
)
TRUNCATE_SD = 4.0
# Mild global atrophy (sulcal widening): share of the outermost 1 mm of cortex lost to CSF. AD loses more on average,
# with overlap (d ≈ 1.25), as cortical thinning of ~0.2-0.5 mm in AD vs age-matched controls.
ATROPHY_MEAN = {"CN": 0.15, "AD": 0.40}
ATROPHY_SD = 0.2
# Grey/white contrast loss: fraction of the WM-GM intensity gap that grey matter loses (Salat et al. 2011). Its size
# is not published in these units; d = 2 puts the whole cohort's AD/CN separability (with the ROI ratios and the
# sulcal widening) in the range of real-ADNI 3-D classifiers (balanced accuracy 0.75-0.95; docs/DESIGN.md §9).
CONTRAST_LOSS_MEAN = {"CN": 0.03, "AD": 0.11}
CONTRAST_LOSS_SD = 0.04
_CONTRAST_RAMP = (0.45, 0.65)  # template T1: CSF/GM border -> typical GM; the loss ramps in over this range

# Template-only structure recipe (ROI-STATISTICS.md §5), mm in MNI space; left side, x mirrored for the right.
_ELLIPSOIDS = {  # centre, semi-axes (x, long, short), tilt of the long axis (anterior end down)
    "hippocampus": ((-26.0, -23.0, -14.0), (9.0, 26.0, 6.0), 37.0),
    "amygdala": ((-23.0, -4.0, -18.0), (10.0, 9.0, 6.0), 30.0),
}
_VENTRICLE_BOX = ((1.0, 36.0), (-60.0, 32.0), (-4.0, 30.0))  # |x|, y, z
_CSF_T1 = 0.45
_WM_T1 = 0.86  # template WM median (ROI-STATISTICS.md §5)
_GM_T1_MAX = 0.75  # above: white matter (template GM 5-95%: 0.565-0.718)
_CSF_T1_MEDIAN = 0.28
_SINK_LENGTH_MM = 12.0  # e-folding distance of tissue removal from the ventricles
_SEPTUM_MM = 1.5  # half-thickness of the white septum between hippocampus and amygdala
_COLLAR_MM = (5.0, 7.0)  # white-matter collar around hippocampus/amygdala: full up to 5 mm, gone at 7 mm


@dataclass(frozen=True)
class RatioDistribution:
    """Per-diagnosis multivariate log-normal over the six ratios (ROI-STATISTICS.md §3)."""

    mu: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    corr: np.ndarray
    truncate_sd: float = TRUNCATE_SD

    def sample(self, rng: np.random.Generator, diagnosis: str) -> np.ndarray:
        """One ratio vector [6] for `diagnosis`; standard scores beyond ±truncate_sd are redrawn."""
        chol = np.linalg.cholesky(self.corr)
        while True:
            z = chol @ rng.standard_normal(N_ROI)
            if np.all(np.abs(z) <= self.truncate_sd):
                return np.exp(self.mu[diagnosis] + self.sigma[diagnosis] * z)


DEFAULT_RATIOS = RatioDistribution(LOG_MU, LOG_SIGMA, LOG_CORR)


@dataclass(frozen=True, eq=False)
class TemplateAnatomy:
    """The 1 mm MNI152 template with structure labels and the unit inflation fields of each structure.

    Attributes:
        t1: [X,Y,Z] float32 T1 in [0, 1] (1 mm, MNI 2009a, RAS).
        labels: [X,Y,Z] uint8 label map (values as in the module docstring).
        affine: 4x4 voxel-to-MNI-mm affine of t1 and labels.
        cube_lo, cube_side: world corner (mm) and side (mm) of the cube that every output size samples.
        fields: [N_ROI + 1, 3, COARSE, COARSE, COARSE] float32: velocity (mm) whose divergence is 1 inside structure k
            (k < N_ROI), or equals the tissue sink density (k = N_ROI), zero elsewhere; on the coarse grid.
        densities: [N_ROI + 1, COARSE, COARSE, COARSE] float32: fraction of each coarse cell in structure k (last:
            other tissue).
        sink: [COARSE, COARSE, COARSE] float32 relative removal rate of tissue (`_sink_density`).
        volumes: [9] float64 template volume (mm³) per label value.
        response: per structure, (rates β [G], log volume factor [G]) measured on the label map warped by the flow
            with that rate (`_measure_response`): the coarse grid blurs each source over its neighbourhood, so a
            structure gains only part of the volume its source creates, and not linearly.
        boxes: per structure, points [3, P] (coarse-grid units) of a box around it, where its volume is measured.
        box_counts: [N_ROI] points of each box inside the unmoved structure.
        cortex_code: [X,Y,Z] uint8: 0 outside the outer cortical layer (grey-matter tissue touching CSF or
            background), else 1..255, a fixed random threshold: the voxel turns to CSF when atrophy·255 >= code.
        cortex_volume: mm³ of that layer.
        structure_points: per structure, up to ~500 of its template voxel coordinates [P, 3] (tiny output sizes).
    """

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    cube_lo: np.ndarray
    cube_side: float
    fields: np.ndarray
    densities: np.ndarray
    sink: np.ndarray
    volumes: np.ndarray
    response: tuple[tuple[np.ndarray, np.ndarray], ...]
    boxes: tuple[np.ndarray, ...]
    box_counts: np.ndarray
    cortex_code: np.ndarray
    cortex_volume: float
    structure_points: tuple[np.ndarray, ...]

    @property
    def coarse_spacing(self) -> float:
        return self.cube_side / (COARSE - 1)


@dataclass(frozen=True, eq=False)
class TemplateSpace:
    """The template seen at one output size S: what every worker needs, computed once per size."""

    anatomy: TemplateAnatomy
    size: int
    affine: np.ndarray  # 4x4 RAS affine of the S³ output grid
    t1_filtered: np.ndarray  # 1 mm T1, Gaussian-prefiltered against aliasing at the output spacing
    cortex_delta: np.ndarray  # prefiltered change of t1 when the whole outer cortical layer turns to CSF

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])


# ---------------------------------------------------------------------------------------------------------------
# Template (once per process / size)


_NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
}


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM, brain mask and affine of the MNI152 2009 template inside the nilearn wheel, offline.

    Read with nibabel from nilearn's package data exactly as `nilearn.datasets.load_mni152_template`,
    `load_mni152_gm_template` (rescaled to max 1) and `load_mni152_brain_mask` (T1 > 0.2) do at resolution 1, but
    without importing nilearn, which pulls in scikit-learn and costs ~3.5 s in every process.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn", "nilearn is not installed; the synthetic cohort needs its MNI152 template")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    arrays = {}
    affine = None
    for key, name in _NILEARN_FILES.items():
        img = nib.load(folder / name)
        data = np.asarray(img.dataobj, dtype=np.float32)
        arrays[key] = data / data.max()
        affine = np.asarray(img.affine, dtype=np.float64)
    return arrays["t1"], arrays["gm"], arrays["t1"] > 0.2, affine


def _world_grid(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    """Open (broadcastable) world-coordinate axes of an axis-aligned grid."""
    axes = [affine[i, i] * np.arange(shape[i], dtype=np.float32) + affine[i, 3] for i in range(3)]
    return [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]


def _box(affine: np.ndarray, shape: tuple[int, ...], lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, ...]:
    """Voxel slices of the world box [lo, hi] on an axis-aligned grid (keeps the recipe's work local)."""
    inv = np.linalg.inv(affine)
    a = nib.affines.apply_affine(inv, np.asarray(lo_mm))
    b = nib.affines.apply_affine(inv, np.asarray(hi_mm))
    lo, hi = np.floor(np.minimum(a, b)).astype(int), np.ceil(np.maximum(a, b)).astype(int) + 1
    return tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(lo, hi, shape, strict=True))


def _template_labels(t1: np.ndarray, gm: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label map of the template by the ROI-STATISTICS.md §5 recipe."""
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[brain] = LABEL_TISSUE
    dark = brain & (t1 < _CSF_T1)
    labels[dark] = LABEL_CSF
    (ax0, ax1), (ay0, ay1), (az0, az1) = _VENTRICLE_BOX
    for side, label in ((-1, 5), (1, 6)):
        xs = sorted((side * ax0, side * ax1))
        box = _box(affine, t1.shape, np.array([xs[0], ay0, az0]), np.array([xs[1], ay1, az1]))
        components, count = ndimage.label(dark[box])  # 6-connected
        if count:
            sizes = np.bincount(components.ravel())[1:]
            labels[box][components == 1 + int(np.argmax(sizes))] = label
    grey = brain & (gm > 0.6) & (t1 >= _CSF_T1)
    x, y, z = _world_grid(t1.shape, affine)
    for name, first_label, rival_name in (("hippocampus", 1, "amygdala"), ("amygdala", 3, "hippocampus")):
        (cx, cy, cz), semi, _ = _ELLIPSOIDS[name]
        for side, label in ((-1, first_label), (1, first_label + 1)):
            centre = np.array([side * abs(cx), cy, cz])
            box = _box(affine, t1.shape, centre - max(semi), centre + max(semi))
            xyz = (x[box[0]], y[:, box[1]], z[:, :, box[2]])
            own = _ellipsoid_distance(name, side, *xyz)
            # Overlapping ellipsoids (hippocampal head / amygdala): the nearer one in ellipsoid distance wins.
            rival = _ellipsoid_distance(rival_name, side, *xyz)
            labels[box][grey[box] & (own <= 1) & (own <= rival)] = label
    return labels


def _white_collar(t1: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """T1 with grey matter turned white in a collar around hippocampus and amygdala, and between them.

    The ellipsoid recipe cuts the medial temporal grey matter where no intensity edge exists (about half of the
    hippocampus's neighbours and three quarters of the amygdala's are grey matter), so the labelled volumes would
    not be visible in the image. A collar of white matter (alveus, fimbria, temporal stem in a real brain) makes
    each structure a grey island whose size an image model, and the intensity-class volumetry, can see.
    """
    roi = (labels >= 1) & (labels <= 4)
    idx = np.argwhere(roi)
    lo = np.maximum(idx.min(0) - int(_COLLAR_MM[1]) - 2, 0)
    hi = np.minimum(idx.max(0) + int(_COLLAR_MM[1]) + 3, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sampling = np.abs(np.diag(affine)[:3])
    # A white septum where hippocampal head and amygdala touch (alveus / uncal recess): without it the two grey
    # structures merge in the image and one's growth reads as the other's. Modifies `labels` in place.
    local_labels = labels[box]
    hippocampus = (local_labels == 1) | (local_labels == 2)
    amygdala = (local_labels == 3) | (local_labels == 4)
    near_amygdala = ndimage.distance_transform_edt(~amygdala, sampling=sampling) <= _SEPTUM_MM
    near_hippocampus = ndimage.distance_transform_edt(~hippocampus, sampling=sampling) <= _SEPTUM_MM
    local_labels[(hippocampus & near_amygdala) | (amygdala & near_hippocampus)] = LABEL_TISSUE
    roi = (labels >= 1) & (labels <= 4)
    distance = ndimage.distance_transform_edt(~roi[box], sampling=sampling)
    weight = np.clip((_COLLAR_MM[1] - distance) / (_COLLAR_MM[1] - _COLLAR_MM[0]), 0.0, 1.0)
    local = t1[box]
    grey = (labels[box] == LABEL_TISSUE) & (local < _WM_T1)
    out = t1.copy()
    out[box] = np.where(grey, local + weight * (_WM_T1 - local), local)
    return out


def _ellipsoid_distance(name: str, side: int, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Squared ellipsoid radius (<= 1 inside) of the recipe's tilted ellipsoid `name` on hemisphere `side`."""
    (cx, cy, cz), (a_x, a_long, a_short), tilt = _ELLIPSOIDS[name]
    t = np.deg2rad(tilt)
    u = np.cos(t) * (y - cy) - np.sin(t) * (z - cz)
    w = np.sin(t) * (y - cy) + np.cos(t) * (z - cz)
    return ((x - side * abs(cx)) / a_x) ** 2 + (u / a_long) ** 2 + (w / a_short) ** 2


def _deposit(points: np.ndarray, lo: np.ndarray, spacing: float, n: int) -> np.ndarray:
    """Cloud-in-cell: spread unit volume at each point (world mm, [P,3]) onto an n³ grid; returns cell fractions."""
    g = (points - lo) / spacing
    out = np.zeros(n**3, dtype=np.float64)
    if len(points) > 200_000:  # the tissue sink: nearest-cell deposit is plenty for a smooth far field, 8x faster
        idx = np.clip(np.rint(g).astype(np.int64), 0, n - 1)
        out += np.bincount(np.ravel_multi_index(idx.T, (n, n, n)), minlength=n**3)
        return out.reshape(n, n, n)
    base = np.floor(g).astype(np.int64)
    frac = g - base
    for corner in np.ndindex(2, 2, 2):
        idx = base + np.array(corner)
        weight = np.prod(np.where(np.array(corner) == 1, frac, 1.0 - frac), axis=1)
        ok = np.all((idx >= 0) & (idx < n), axis=1)
        flat = np.ravel_multi_index(idx[ok].T, (n, n, n))
        out += np.bincount(flat, weights=weight[ok], minlength=n**3)
    return out.reshape(n, n, n)


def _unit_source_field(density: np.ndarray, spacing: float) -> np.ndarray:
    """Free-space field [3,n,n,n] (mm) with divergence = density: gradient of the Newtonian potential.

    Zero-padded FFT convolution (Hockney), so the volume a structure gains is not wrapped around the cube.
    """
    n = density.shape[0]
    m = 2 * n
    d = np.fft.fftfreq(m, 1.0 / m).astype(np.float64)  # signed integer offsets 0..n-1, -n..-1
    dx, dy, dz = np.meshgrid(d, d, d, indexing="ij")
    r3 = (dx**2 + dy**2 + dz**2) ** 1.5
    r3[0, 0, 0] = np.inf  # no self-field: a cell pushes its neighbours, not itself
    padded = np.zeros((m, m, m))
    padded[:n, :n, :n] = density
    spectrum = scipy.fft.rfftn(padded)
    field = np.empty((3, n, n, n), dtype=np.float32)
    for axis, offset in enumerate((dx, dy, dz)):
        kernel = spacing * offset / (4.0 * np.pi * r3)
        conv = scipy.fft.irfftn(spectrum * scipy.fft.rfftn(kernel), s=(m, m, m))
        field[axis] = conv[:n, :n, :n]
    return field


@functools.lru_cache(maxsize=1)
def template_anatomy() -> TemplateAnatomy:
    """Template, labels and unit inflation fields; memoised because it takes a few seconds and never changes."""
    t1, gm, brain, affine = _load_mni152()
    labels = _template_labels(t1, gm, brain, affine)
    t1 = _white_collar(t1, labels, affine)
    idx = np.argwhere(brain)
    lo_mm = nib.affines.apply_affine(affine, idx.min(0) - 0.5)
    hi_mm = nib.affines.apply_affine(affine, idx.max(0) + 0.5)
    cube_lo, side = cube_box(lo_mm, hi_mm)  # the same margin rule as prepared real scans
    spacing = side / (COARSE - 1)
    fields = np.empty((N_ROI + 1, 3, COARSE, COARSE, COARSE), dtype=np.float32)
    densities = np.empty((N_ROI + 1, COARSE, COARSE, COARSE), dtype=np.float32)
    scale, offset = np.diag(affine)[:3], affine[:3, 3]  # the template grid is axis-aligned
    for k, label in enumerate((*range(1, N_ROI + 1), LABEL_TISSUE)):
        points = np.argwhere(labels == label).astype(np.float64) * scale + offset
        densities[k] = _deposit(points, cube_lo, spacing, COARSE) / spacing**3  # 1 mm³ voxels -> cell fraction
    sink = _sink_density(densities, spacing)
    for k in range(N_ROI + 1):
        fields[k] = _unit_source_field(densities[k] if k < N_ROI else sink, spacing)
    volumes = np.bincount(labels.ravel(), minlength=LABEL_CSF + 1).astype(np.float64)  # 1 mm³ voxels
    boxes = _structure_boxes(labels, affine, cube_lo, spacing)
    response, box_counts = _measure_response(labels, affine, cube_lo, spacing, fields, boxes)
    cortex_code = _outer_cortex(t1, labels)
    return TemplateAnatomy(
        t1,
        labels,
        affine,
        cube_lo,
        side,
        fields,
        densities,
        sink,
        volumes,
        response,
        tuple(boxes),
        box_counts,
        cortex_code,
        float(np.count_nonzero(cortex_code)),
        tuple(_subsample(np.argwhere(labels == k + 1).astype(np.float32), 500) for k in range(N_ROI)),
    )


def _subsample(points: np.ndarray, limit: int) -> np.ndarray:
    return points[:: max(1, len(points) // limit)]


def _outer_cortex(t1: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Outer cortical layer with fixed random thresholds (uint8 codes 1..255), where global atrophy acts.

    Grey-matter-intensity tissue face-adjacent to sulcal CSF or background: the layer that sulcal widening removes.
    The thresholds come from a fixed seed so that every subject and every run agree (no global random state).
    """
    outside = (labels == 0) | (labels == LABEL_CSF)
    grey = (labels == LABEL_TISSUE) & (t1 >= _CSF_T1) & (t1 < _GM_T1_MAX)
    layer = grey & ndimage.binary_dilation(outside)
    code = np.zeros(labels.shape, dtype=np.uint8)
    thresholds = np.random.default_rng(20091).integers(1, 256, size=int(layer.sum()), dtype=np.uint8)
    code[layer] = thresholds
    return code


def _sink_density(densities: np.ndarray, spacing: float) -> np.ndarray:
    """Where tissue is removed to make room for the structures' growth: tissue weighted by nearness to the ventricles.

    Ventricles enlarge ex vacuo, into periventricular tissue; a sink spread over the whole brain would instead push
    everything between the ventricles and the cortex, moving the hippocampi and amygdalae out of their place.
    """
    ventricles = densities[4] + densities[5] > 0.05
    distance = ndimage.distance_transform_edt(~ventricles, sampling=spacing)
    return (densities[N_ROI] * np.exp(-distance / _SINK_LENGTH_MM)).astype(np.float32)


def _structure_boxes(labels: np.ndarray, affine: np.ndarray, cube_lo: np.ndarray, spacing: float) -> list[np.ndarray]:
    """Per structure, grid points [3, P] (coarse-grid units) of a box around it wide enough to hold its growth."""
    boxes = []
    for k, name in enumerate(ROI_NAMES):
        kind = name.rsplit("_", 1)[0]
        idx = np.argwhere(labels == k + 1)
        lo = nib.affines.apply_affine(affine, idx.min(0)) - _BOX_MARGIN_MM[kind]
        hi = nib.affines.apply_affine(affine, idx.max(0)) + _BOX_MARGIN_MM[kind]
        axes = [np.arange(lo[i], hi[i], _BOX_STEP_MM[kind]) for i in range(3)]
        points = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        boxes.append(((points - cube_lo[:, None]) / spacing).astype(np.float32))
    return boxes


def _box_volumes(
    labels: np.ndarray,
    affine: np.ndarray,
    cube_lo: np.ndarray,
    spacing: float,
    backward: np.ndarray,
    boxes: list[np.ndarray] | tuple[np.ndarray, ...],
) -> np.ndarray:
    """Points of each structure's box that a backward map [3,C,C,C] (coarse units) sends into that structure."""
    inv = np.linalg.inv(affine)
    points = np.concatenate(boxes, axis=1)  # one interpolation call per axis for all boxes
    moved = np.stack([ndimage.map_coordinates(backward[i], points, order=1, mode="nearest") for i in range(3)])
    vox = (moved * spacing + cube_lo[:, None]) * np.diag(inv)[:3, None] + inv[:3, 3, None]
    found = ndimage.map_coordinates(labels, vox, order=0, mode="constant")
    parts = np.split(found, np.cumsum([b.shape[1] for b in boxes])[:-1])
    return np.array([np.count_nonzero(part == k + 1) for k, part in enumerate(parts)], dtype=np.float64)


def _measure_response(
    labels: np.ndarray,
    affine: np.ndarray,
    cube_lo: np.ndarray,
    spacing: float,
    fields: np.ndarray,
    boxes: list[np.ndarray],
) -> tuple[tuple[tuple[np.ndarray, np.ndarray], ...], np.ndarray]:
    """Volume factor of each structure under its own flow, for the rates in `_RESPONSE_BETA` (~2 s, once).

    Returns the per-structure (rates, log factors) table and each structure's point count in its box at rest.

    Medial-temporal structures (hippocampi, amygdalae: they touch) share runs, the ventricles have their own, so
    neighbours are displaced together as in a subject; left and right run at once (they are far apart).
    """
    groups = {"hippocampus": (0, 1, 2, 3), "lateral_ventricle": (4, 5)}
    table = [None] * N_ROI
    base_counts = np.zeros(N_ROI)
    for group, members in groups.items():
        betas = np.asarray(_RESPONSE_BETA[group])
        counts = np.empty((len(betas), N_ROI))
        for j, b in enumerate(betas):
            beta = np.zeros(N_ROI + 1)
            beta[list(members)] = b
            backward = np.indices(fields.shape[2:], dtype=np.float32) + _flow_backward(fields, beta, spacing)
            counts[j] = _box_volumes(labels, affine, cube_lo, spacing, backward, boxes)
        base = counts[np.flatnonzero(betas == 0.0)[0]]
        base_counts[list(members)] = base[list(members)]
        for k in members:
            log_q = np.log(np.maximum(counts[:, k], 1.0) / base[k])
            table[k] = (betas, np.maximum.accumulate(log_q))  # monotone for np.interp
    return tuple(table), base_counts


@functools.lru_cache(maxsize=2)
def template_space(size: int) -> TemplateSpace:
    """The template at output size S (any S ≥ 8; 16, 32, 64 and 128 are tested)."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    anatomy = template_anatomy()
    affine = cube_affine(anatomy.cube_lo, anatomy.cube_side, size)
    h = anatomy.cube_side / size
    # Anti-aliasing before point sampling: a Gaussian whose FWHM is the output voxel (1 mm voxels already there).
    sigma = np.sqrt(max(h**2 - 1.0, 0.0)) / 2.3548

    def prefilter(volume: np.ndarray) -> np.ndarray:
        return (ndimage.gaussian_filter(volume, sigma) if sigma > 0.05 else volume).astype(np.float32)

    atrophied = np.where(anatomy.cortex_code > 0, np.float32(_CSF_T1_MEDIAN), anatomy.t1)
    t1 = prefilter(anatomy.t1)
    return TemplateSpace(anatomy, size, affine, t1, prefilter(atrophied) - t1)


# ---------------------------------------------------------------------------------------------------------------
# One subject


@dataclass(frozen=True)
class SubjectParams:
    """Every random draw of one subject, taken before any size-dependent draw (noise) so anatomy ignores S."""

    ratios: np.ndarray  # [6] sampled target ratios
    affine: np.ndarray  # 3x4 small random affine (backward, about the cube centre)
    warp: np.ndarray  # [3, 5, 5, 5] control-point displacements (mm) of the smooth global deformation
    bias: np.ndarray  # [4, 4, 4] log bias-field control points
    gamma: float
    noise: float  # Rician noise SD relative to the WM intensity
    atrophy: float  # fraction of the outer cortical layer (1 mm) turned to sulcal CSF, in [0, 1]
    contrast_loss: float  # fraction of the WM-GM intensity gap lost by grey matter, in [0, 0.5]


def draw_subject(rng: np.random.Generator, diagnosis: str, ratios: RatioDistribution = DEFAULT_RATIOS) -> SubjectParams:
    """Draw the parameters of one subject from its own generator."""
    target = ratios.sample(rng, diagnosis)
    angles = np.deg2rad(rng.uniform(-3.0, 3.0, size=3))
    scale = np.exp(rng.normal(0.0, 0.015, size=3))
    shift = rng.uniform(-1.5, 1.5, size=3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    affine = np.concatenate([rot * scale, shift[:, None]], axis=1)
    warp = rng.normal(0.0, 2.0, size=(3, 5, 5, 5))
    bias = rng.normal(0.0, 0.03, size=(4, 4, 4))
    gamma = float(np.exp(rng.uniform(-0.1, 0.1)))
    noise = float(rng.uniform(0.015, 0.04))
    atrophy = float(np.clip(rng.normal(ATROPHY_MEAN[diagnosis], ATROPHY_SD), 0.0, 1.0))
    contrast_loss = float(np.clip(rng.normal(CONTRAST_LOSS_MEAN[diagnosis], CONTRAST_LOSS_SD), 0.0, 0.5))
    return SubjectParams(target, affine, warp, bias, gamma, noise, atrophy, contrast_loss)


def _target_factors(anatomy: TemplateAnatomy, ratios: np.ndarray, atrophy: float) -> tuple[np.ndarray, float]:
    """Template-space volume factors [N_ROI] that give the target ratios, and the tissue sink rate.

    The tissue sink removes what the structures gain, so the brain keeps its volume and whole brain
    W' = W0 - cortical atrophy - ΔV(ventricles) (hippocampal/amygdalar change is tissue either way); structure k's
    target volume is ratio_k · W'.
    """
    v0 = anatomy.volumes[1 : N_ROI + 1]
    w0 = anatomy.volumes[list(WHOLE_BRAIN_LABELS)].sum() - atrophy * anatomy.cortex_volume
    vent = [4, 5]
    w_new = (w0 + v0[vent].sum()) / (1.0 + ratios[vent].sum())
    target = ratios * w_new
    return target / v0, _sink_rate(anatomy, float((target - v0).sum()))


def _sink_rate(anatomy: TemplateAnatomy, removed: float) -> float:
    """Rate σ at which the sink removes `removed` mm³ of tissue: sum_cells tissue·(1 - exp(-σ·w)) = removed."""
    tissue = anatomy.densities[N_ROI].ravel().astype(np.float64) * anatomy.coarse_spacing**3
    weight = anatomy.sink.ravel().astype(np.float64) / np.maximum(anatomy.densities[N_ROI].ravel(), 1e-6)
    keep = tissue > 0
    tissue, weight = tissue[keep], weight[keep]
    lo, hi = -3.0, 30.0  # negative: net shrinkage of the structures gives tissue back
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if (tissue * (1.0 - np.exp(-mid * weight))).sum() < removed:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _rates(anatomy: TemplateAnatomy, log_q: np.ndarray, sink: float) -> np.ndarray:
    """Rates β [N_ROI + 1] for log volume factors, from the measured response (last entry: the tissue sink)."""
    beta = [np.interp(log_q[k], anatomy.response[k][1], anatomy.response[k][0]) for k in range(N_ROI)]
    return np.array([*beta, -sink])


def _compose(z: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Backward map subject -> template (coarse units): the global map z, then the flow displacement u at z."""
    return z + np.stack([ndimage.map_coordinates(u[i], z, order=1, mode="nearest") for i in range(3)])


def _solve_map(
    anatomy: TemplateAnatomy, ratios: np.ndarray, atrophy: float, z: np.ndarray, corrections: int = 1
) -> np.ndarray:
    """Backward map subject -> template (coarse units) that brings each structure to its target ratio.

    First guess: rates from the response table, with each structure's target divided by the volume change the global
    deformation makes there (its mean Jacobian) and multiplied by the whole brain's. Then the volumes reached in
    subject space are measured (boxes around each structure) and the rates corrected, a fixed point on the table's
    log factor: this absorbs left/right and structure interactions, the tissue sink, and the blur of re-sampling the
    flow at the globally deformed positions, which otherwise costs thin ventricles ~5% of their growth.
    """
    hc = anatomy.coarse_spacing
    factors, sink = _target_factors(anatomy, ratios, atrophy)
    expand = 1.0 / np.clip(_jacobian_det(z), 0.2, 5.0)  # subject volume per template volume
    weights = anatomy.densities.reshape(N_ROI + 1, -1)
    local = np.log((weights @ expand.ravel()) / weights.sum(1))
    goal = np.log(factors) + local[N_ROI]  # subject-space volume / template volume, whole brain scaled alike
    aim = goal - local[:N_ROI]
    m = _compose(z, _flow_backward(anatomy.fields, _rates(anatomy, aim, sink), hc))
    for _ in range(corrections):
        counts = _box_volumes(anatomy.labels, anatomy.affine, anatomy.cube_lo, hc, m, anatomy.boxes)
        aim = aim + (goal - np.log(np.maximum(counts, 1.0) / anatomy.box_counts))
        m = _compose(z, _flow_backward(anatomy.fields, _rates(anatomy, aim, sink), hc))
    return m


@functools.lru_cache(maxsize=16)
def _interpolation_taps(n_out: int, n_in: int, order: int, centres: bool) -> tuple[np.ndarray, np.ndarray]:
    """1-D interpolation from n_in points spanning an interval to n_out points in it, as (index, weight) [n_out, T].

    `centres`: output points are the centres of n_out cells (the S³ voxels); else they span the interval's ends too
    (corner to corner). Applied along each axis, this is the tensor-product spline of `ndimage.zoom`; as a short
    gather per output point it avoids BLAS, whose threads fight the worker processes for the cores.
    """
    if centres:
        position = (np.arange(n_out) + 0.5) * (n_in - 1) / n_out
    else:
        position = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
    matrix = np.empty((n_out, n_in))
    for i in range(n_in):
        unit = np.zeros(n_in)
        unit[i] = 1.0
        coefficients = ndimage.spline_filter1d(unit, order=order, mode="nearest") if order > 1 else unit
        matrix[:, i] = ndimage.map_coordinates(
            coefficients, position[None], order=order, mode="nearest", prefilter=False
        )
    matrix[np.abs(matrix) < 1e-7] = 0.0
    taps = max(1, int((matrix != 0).sum(1).max()))
    index = np.argsort(matrix == 0, axis=1, kind="stable")[:, :taps]
    weight = np.take_along_axis(matrix, index, axis=1)
    return index, weight.astype(np.float32)


def _separable(field: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Interpolate `field` [..., m, m, m] along each of its last three axes with `_interpolation_taps`."""
    index, weight = taps
    out = field
    for axis in (-1, -2, -3):
        shape = [1] * out.ndim
        shape[axis] = -1
        acc = None
        for t in range(index.shape[1]):
            term = np.take(out, index[:, t], axis=axis) * weight[:, t].reshape(shape)
            acc = term if acc is None else acc + term
        out = acc
    return out


def _global_backward(params: SubjectParams, c: int, hc: float) -> np.ndarray:
    """Subject -> pre-flow template position [3,C,C,C] (coarse-grid units): small affine + smooth warp."""
    grid = np.indices((c, c, c), dtype=np.float32)
    centre = (c - 1) / 2.0
    warp = _separable(params.warp.astype(np.float32), _interpolation_taps(c, params.warp.shape[1], 3, False))
    lin = params.affine[:, :3].astype(np.float32)
    shift = (params.affine[:, 3] / hc).astype(np.float32)[:, None, None, None]
    rel = grid - centre
    # Written out rather than tensordot: BLAS threads would oversubscribe the worker processes' cores.
    rotated = np.stack([lin[i, 0] * rel[0] + lin[i, 1] * rel[1] + lin[i, 2] * rel[2] for i in range(3)])
    return rotated + centre + shift + warp / hc


def _flow_backward(fields: np.ndarray, beta: np.ndarray, hc: float) -> np.ndarray:
    """Displacement [3,C,C,C] (coarse-grid units) of exp(-v), v = sum_k beta_k fields_k: scaling and squaring."""
    u = np.zeros(fields.shape[1:], dtype=np.float32)
    for k in np.flatnonzero(beta):  # a weighted sum without BLAS (whose threads fight the worker processes)
        u -= np.float32(beta[k] / hc) * fields[k]
    steps = int(np.clip(np.ceil(np.log2(max(float(np.abs(u).max()), 1e-6) / 0.5)), 0, 12))
    u /= 2.0**steps
    grid = np.indices(u.shape[1:], dtype=np.float32)
    for _ in range(steps):
        at = grid + u
        u = u + np.stack([ndimage.map_coordinates(u[i], at, order=1, mode="nearest") for i in range(3)])
    return u


def _jacobian_det(z: np.ndarray) -> np.ndarray:
    """det(dz/dy) [C,C,C] of a map [3,C,C,C] given on a grid (central differences)."""
    g = [np.gradient(z[i]) for i in range(3)]  # g[i][j] = dz_i / dy_j
    return (
        g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
        - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
        + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0])
    )


def _compose_backward(anatomy: TemplateAnatomy, params: SubjectParams) -> np.ndarray:
    """Backward map on the coarse grid: subject voxel -> template world mm [3,C,C,C]."""
    hc = anatomy.coarse_spacing
    z = _global_backward(params, COARSE, hc)
    m = _solve_map(anatomy, params.ratios, params.atrophy, z)
    return (m * hc + anatomy.cube_lo[:, None, None, None]).astype(np.float32)


def synthesize_subject(
    space: TemplateSpace, params: SubjectParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One subject at size S: (image [S,S,S] float32 z-scored in the brain, labels [S,S,S] uint8)."""
    anatomy = space.anatomy
    s = space.size
    coarse_world = _compose_backward(anatomy, params)
    inv = np.linalg.inv(anatomy.affine)
    # Template voxel coordinates of every output voxel: coarse map upsampled (linear) to the S³ voxel centres.
    coarse_vox = coarse_world * np.diag(inv)[:3, None, None, None] + inv[:3, 3, None, None, None]
    coords = _separable(coarse_vox, _interpolation_taps(s, COARSE, 1, True))
    labels = ndimage.map_coordinates(anatomy.labels, coords, order=0, mode="constant", cval=0).astype(np.uint8)
    t1 = ndimage.map_coordinates(space.t1_filtered, coords, order=1, mode="constant", cval=0.0)
    if params.atrophy > 0:
        # A cortex voxel of the outer layer is lost to CSF when its fixed random threshold is below the subject's
        # atrophy; the image darkens by the same expected fraction (prefiltered difference map).
        code = ndimage.map_coordinates(anatomy.cortex_code, coords, order=0, mode="constant", cval=0)
        lost = (code > 0) & (code.astype(np.float32) <= params.atrophy * 255.0) & (labels == LABEL_TISSUE)
        labels[lost] = LABEL_CSF
        t1 += params.atrophy * ndimage.map_coordinates(space.cortex_delta, coords, order=1, mode="constant", cval=0.0)
    if params.contrast_loss > 0:
        t1 = reduce_grey_white_contrast(t1, params.contrast_loss)
    bias = np.exp(_separable(params.bias.astype(np.float32), _interpolation_taps(s, params.bias.shape[0], 3, True)))
    _keep_every_structure(labels, coords, anatomy)
    brain = labels > 0
    signal = np.clip(t1, 0.0, None) ** params.gamma * bias
    sd = params.noise * 0.86  # WM intensity of the template
    real = signal + rng.normal(0.0, sd, size=signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sd, size=signal.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician
    magnitude[~brain] = 0.0  # skull-stripped, as a prepared real scan
    return zscore_in_mask(magnitude.astype(np.float32), brain), labels


def reduce_grey_white_contrast(t1: np.ndarray, loss: float) -> np.ndarray:
    """Move grey-matter intensities a fraction `loss` of the way to white matter (template T1 scale).

    The weight ramps from 0 at the CSF/GM border to 1 at typical grey matter, and the shift vanishes at the WM
    intensity, so CSF and WM keep their values and the map stays strictly increasing (slope >= 1 - loss): no
    contrast inversion, only a smaller GM/WM gap.
    """
    lo, hi = _CONTRAST_RAMP
    ramp = np.clip((t1 - lo) / (hi - lo), 0.0, 1.0)
    return (t1 + loss * np.clip(_WM_T1 - t1, 0.0, None) * ramp).astype(np.float32)


def _keep_every_structure(labels: np.ndarray, coords: np.ndarray, anatomy: TemplateAnatomy) -> None:
    """Give a structure that point sampling missed (sizes <= 16: voxels of ~12 mm) its nearest brain voxel.

    A ratio of 0 would be an invalid clinical vector; a structure smaller than a voxel still occupies one.
    """
    for k in range(1, N_ROI + 1):
        if np.any(labels == k):
            continue
        candidates = np.flatnonzero((labels == LABEL_TISSUE) | (labels == LABEL_CSF))
        if candidates.size == 0:
            continue
        where = coords.reshape(3, -1)[:, candidates].T  # template voxel coordinates of the candidates
        points = anatomy.structure_points[k - 1]
        near = np.argsort(((where - points.mean(0)) ** 2).sum(1))[:256]  # shortlist by the centroid, then exact
        distance = ((where[near, None, :] - points[None]) ** 2).sum(-1).min(1)
        labels.flat[candidates[near[int(np.argmin(distance))]]] = k


def label_ratios(labels: np.ndarray) -> np.ndarray:
    """Exact ratios [6] (float64) of a label map: voxels of structure k / whole-brain voxels."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=LABEL_CSF + 1).astype(np.float64)
    return counts[1 : N_ROI + 1] / counts[list(WHOLE_BRAIN_LABELS)].sum()


# ---------------------------------------------------------------------------------------------------------------
# Cohort


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def _diagnoses(n: int, seed: int) -> list[str]:
    """Half AD (rounded down), in a seeded order: balanced even for the tiny cohorts of the tests."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    names = ["AD"] * (n // 2) + ["CN"] * (n - n // 2)
    return [names[i] for i in rng.permutation(n)]


def _make_subject(task: tuple[int, int, int, str, str, str]) -> list[float]:
    """Generate subject `index`, write its image and label map, return the measured ratios.

    `template_space` is memoised and computed by the parent before the pool starts, so forked workers inherit it.
    """
    size, seed, index, diagnosis, image_path, label_path = task
    space = template_space(size)
    rng = _subject_rng(seed, index)
    params = draw_subject(rng, diagnosis)
    image, labels = synthesize_subject(space, params, rng)
    save_nifti_atomic(image, space.affine, Path(image_path))
    save_nifti_atomic(labels, space.affine, Path(label_path))
    return [float(v) for v in label_ratios(labels)]


def synthesize_cohort(
    out: Path, n: int, size: int, seed: int, workers: int = 2, progress: bool = True, overwrite: bool = False
) -> Path:
    """Write the synthetic cohort to `out` (built in a temporary sibling folder, then renamed into place).

    Args:
        out: cohort folder to create; must not exist or be empty unless `overwrite`.
        n: number of subjects (one scan each), half AD.
        size: output cube side S (voxels).
        seed: cohort seed; subject i is seeded by (seed, i) only.
        workers: processes; the result does not depend on it.
        progress: show a tqdm bar.
        overwrite: replace an existing non-empty `out`.

    Returns:
        `out`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "output folder exists and is not empty (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_cohort(tmp, n, size, seed, workers, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_cohort(folder: Path, n: int, size: int, seed: int, workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    space = template_space(size)
    rows = []
    tasks = []
    for i, diagnosis in enumerate(_diagnoses(n, seed)):
        subject = f"sub-{i:04d}"
        image = f"images/{subject}_bl.nii"
        label_map = f"labels/{subject}_bl.nii"
        rows.append(
            {"subject_id": subject, "scan_id": "bl", "image": image, "label_map": label_map, "diagnosis": diagnosis}
        )
        tasks.append((size, seed, i, diagnosis, str(folder / image), str(folder / label_map)))
    bar = tqdm(total=n, desc=f"synth {size}³", unit="subj", disable=not progress)
    try:
        if workers <= 1 or n == 1:
            ratios = []
            for task in tasks:
                ratios.append(_make_subject(task))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                ratios = []
                for r in pool.map(_make_subject, tasks, chunksize=max(1, min(8, n // (4 * workers)))):
                    ratios.append(r)
                    bar.update()
    finally:
        bar.close()
    table = pd.DataFrame(rows)
    for j, name in enumerate(ROI_NAMES):
        table[name] = [r[j] for r in ratios]
    # float_format=None writes repr(float): reading the CSV back gives the label-map ratio bit for bit.
    table.to_csv(folder / "clinical.csv", index=False)
    meta = {
        "kind": "synthetic",
        "source": f"synthetic:n={n},size={size},seed={seed}",
        "n": n,
        "size": size,
        "seed": seed,
        "version": GENERATOR_VERSION,
        "labels": {
            "0": "background",
            **{str(i + 1): name for i, name in enumerate(ROI_NAMES)},
            str(LABEL_TISSUE): "tissue",
            str(LABEL_CSF): "csf",
        },
        "whole_brain_labels": list(WHOLE_BRAIN_LABELS),
        "spacing_mm": space.spacing,
        "diagnoses": sorted(DIAGNOSES),
    }
    (folder / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")


def default_synthetic_cohort(
    n: int, size: int, seed: int, cache_dir: Path, workers: int = 2, progress: bool = True
) -> Path:
    """The synthetic cohort (n, size, seed) under `cache_dir`, created once and reused (keyed by generator version)."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic-n{n}-s{size}-seed{seed}-v{GENERATOR_VERSION}"
    if (final / "cohort.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        _write_cohort(tmp, n, size, seed, workers, progress)
        try:
            os.replace(tmp, final)  # atomic; fails if a concurrent process got there first
        except OSError:
            if not (final / "cohort.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Volumetry by known intensity classes (DESIGN §5, volumetric consistency on the synthetic cohort)

# Class means (z-scores inside the brain) of the template's CSF, GM and WM, the k-means start for each volume.
_CLASS_START = np.array([-2.3, -0.3, 1.2])
_MEASURE_DILATION_MM = {"hippocampus": 5.0, "amygdala": 5.0, "lateral_ventricle": 12.0}
_MEASURE_NEIGHBOURHOOD_MM = 20.0  # where a structure's local grey/white means are estimated


@dataclass(frozen=True, eq=False)
class MeasureRegions:
    """Fixed MNI-space regions at size S for `measure_roi_ratios` (flat voxel indices per structure).

    Attributes:
        size: S.
        regions: per structure, indices of its search region (template structure, dilated).
        neighbourhoods: per structure, indices of the surroundings whose grey/white means calibrate its grey fraction.
    """

    size: int
    regions: tuple[np.ndarray, ...]
    neighbourhoods: tuple[np.ndarray, ...]


@functools.lru_cache(maxsize=4)
def measure_regions(size: int) -> MeasureRegions:
    """Each structure's template label at the S³ voxel centres, dilated (ventricles by more: they grow ~3-30x).

    Hippocampus and amygdala touch; a voxel both dilations reach goes to the nearer template structure.
    """
    space = template_space(size)
    anatomy = space.anatomy
    inv = np.linalg.inv(anatomy.affine)
    centres = _world_grid((size,) * 3, space.affine)
    vox = [np.broadcast_to(centres[i] * inv[i, i] + inv[i, 3], (size,) * 3) for i in range(3)]
    labels = ndimage.map_coordinates(anatomy.labels, np.stack(vox), order=0, mode="constant")
    distance = np.empty((N_ROI, size, size, size))
    for k in range(N_ROI):
        mask = labels == k + 1
        if not mask.any():  # tiny sizes: the voxel nearest to the structure's centroid
            world = nib.affines.apply_affine(anatomy.affine, np.argwhere(anatomy.labels == k + 1).mean(0))
            idx = np.rint(nib.affines.apply_affine(np.linalg.inv(space.affine), world)).astype(int)
            mask[tuple(np.clip(idx, 0, size - 1))] = True
        distance[k] = ndimage.distance_transform_edt(~mask, sampling=space.spacing)
    regions, neighbourhoods = [], []
    for k, name in enumerate(ROI_NAMES):
        region = distance[k] <= max(_MEASURE_DILATION_MM[name.rsplit("_", 1)[0]], space.spacing)
        if k < 4:  # hippocampus (0, 1) vs amygdala (2, 3) of the same side
            region &= distance[k] <= distance[(k + 2) % 4]
        regions.append(np.flatnonzero(region))
        neighbourhoods.append(np.flatnonzero(distance[k] <= _MEASURE_NEIGHBOURHOOD_MM))
    return MeasureRegions(size, tuple(regions), tuple(neighbourhoods))


def _kmeans_1d(values: np.ndarray, means: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Class means of 1-D values by k-means from `means` (sorted result); a class left empty keeps its start."""
    means = np.asarray(means, dtype=np.float64).copy()
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - means[None]).argmin(1)
        for c in range(len(means)):
            members = values[nearest == c]
            if members.size:
                means[c] = members.mean()
    return np.sort(means)


def measure_roi_ratios(volume: np.ndarray, size: int | None = None) -> np.ndarray:
    """Structure / whole-brain ratios of synthetic-space volumes by known intensity classes (DESIGN §5).

    A method that took no part in training, for the volumetric consistency of generated volumes. Inside a fixed
    MNI-space search region per structure it sums the partial-volume fraction of the structure's tissue class: CSF for
    the ventricles (between the volume's CSF and GM means), grey matter for hippocampus and amygdala (between CSF and
    GM, and between GM and WM, with GM/WM means estimated within 20 mm of the structure, so a smooth bias field does
    not shift them). The sum is divided by the brain's tissue volume (brain = voxels above the midpoint of background
    and CSF; tissue = brain minus its CSF fraction). Class means come from k-means on each volume, so a generator's
    global contrast or offset does not bias the result.

    Args:
        volume: [S,S,S], [N,S,S,S] or [N,1,S,S,S] (numpy or torch), z-scored like the synthetic cohort.
        size: S, checked against the volume when given.

    Returns:
        [6] or [N, 6] float64 ratios in `ROI_NAMES` order (same scale as the label-map ratios up to partial volume).
    """
    array = volume.detach().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    s = array.shape[-1]
    if array.ndim not in (3, 4, 5) or array.shape[-3:] != (s, s, s) or (size is not None and size != s):
        raise ValueError(f"expected [..., S, S, S] volumes with S = {size or s}, got shape {tuple(array.shape)}")
    if array.ndim == 5 and array.shape[1] != 1:
        raise ValueError(f"expected one channel, got shape {tuple(array.shape)}")
    batch = array.reshape(-1, s**3).astype(np.float32, copy=False)
    regions = measure_regions(s)
    out = np.empty((batch.shape[0], N_ROI))
    for n, x in enumerate(batch):
        cube = x.reshape(s, s, s)
        shell = np.concatenate([cube[[0, -1]].ravel(), cube[:, [0, -1]].ravel(), cube[..., [0, -1]].ravel()])
        background = float(np.median(shell))
        inside = x[x > background + 0.5]
        if inside.size < 10:
            out[n] = 0.0
            continue
        csf, gm, wm = _kmeans_1d(inside[:: max(1, inside.size // 20000)], _CLASS_START)
        brain = x > 0.5 * (background + csf)
        csf_fraction = np.clip((gm - x) / max(gm - csf, 1e-6), 0.0, 1.0)
        tissue = max(float(((1.0 - csf_fraction) * brain).sum()), 1.0)
        for k in range(N_ROI):
            idx = regions.regions[k]
            values = x[idx]
            if k >= 4:
                out[n, k] = float((csf_fraction[idx] * brain[idx]).sum()) / tissue
                continue
            near = x[regions.neighbourhoods[k]]
            local_gm, local_wm = _kmeans_1d(near[near > 0.5 * (csf + gm)], (gm, wm))
            below = np.clip((values - csf) / max(local_gm - csf, 1e-6), 0.0, 1.0)
            above = np.clip((local_wm - values) / max(local_wm - local_gm, 1e-6), 0.0, 1.0)
            out[n, k] = float(np.where(values < local_gm, below, above).sum()) / tissue
    return out.reshape(*array.shape[: 1 if array.ndim > 3 else 0], N_ROI) if array.ndim > 3 else out[0]
