"""A simulated T1 brain-MRI cohort built from the MNI152 2009 template (`bench data brain-sim`).

Writes the layout `bench.brain.cohort` reads (a `metadata.csv` and one `<id>.nii.gz` per
subject), so everything downstream runs the real code path. The template is nilearn's
ICBM152 2009 nonlinear symmetric T1, grey- and white-matter probability maps (1 mm); CSF is
the template's brain mask minus the two. It is cropped to a 200 mm cube and area-averaged
to the requested edge once per process.

Per subject:
- age: the original report's training cohort (466 controls, ages 6.69-78.20, mean 24.62,
  s.d. 12.68; per 10-year bucket 21 / 152 / 220 / 24 / 14 / 9 / 18 / 8 from 0-10 to
  70-80): inverse-CDF sampling through a monotone (PCHIP) interpolation of the cumulative
  bucket counts, so every bucket keeps its exact share and the density inside a bucket
  follows its neighbours (mean 24.8, s.d. 13.6 in expectation).
- sex scales head size: women's intracranial volume is ~12% smaller (Ruigrok et al. 2014,
  Neurosci Biobehav Rev 39:34), so 0.96 linear; individual spread 3% linear; the brain
  still grows ~2% (linear) between 6 and 12 (Giedd et al. 1999, Nat Neurosci 2:861).
- "biological" age = age + N(0, 3 y): the individual spread of brain ageing, which no
  model can predict from the image; every subject is a control, as in the report (an
  earlier version of this simulator gave 8% patients a +4 y gap).
- grey matter peaks in childhood (GMV peak 5.9 y in Bethlehem et al. 2022, Nature
  604:525) and declines through adulthood, ~0.25%/y accelerating to ~25% lost by 80
  (linear GM decline with age, Good et al. 2001, NeuroImage 14:21); the lost GM becomes
  sulcal CSF. A smooth per-subject field (+-8%) varies local GM.
- white matter rises to a mid-life peak and declines after it (Ge et al. 2002, AJNR
  23:1327: WM grows until ~40; Westlye et al. 2010, Cereb Cortex 20:2055); peak here 35 y,
  -13% at 6 y, -20% at 80 y. Before the peak the missing WM is unmyelinated tissue that
  looks like GM on T1; after it, it becomes CSF.
- ventricles widen with age, slowly then faster (lateral ventricles roughly triple
  between 20 and 80: Bethlehem et al. 2022; Fjell & Walhovd 2010, Rev Neurosci 21:187):
  tissue within r(age) = 5 mm * ((age - 6) / 74)^2 of the template ventricles turns to CSF.
- a smooth random deformation (control grid 5^3, 3 mm s.d.), rotation (2 deg s.d.) and
  shift (2 mm s.d.) give individual anatomy.
- site: intensity gain, smooth multiplicative bias field, Rician noise level, field
  strength (1.5 T: lower GM/WM contrast) and the stored orientation (RAS, LAS, LPS: the
  loader must reorient). WM intensity falls and GM/WM contrast shrinks with age (Salat et
  al. 2009, NeuroImage 48:21): -0.001 per year after 20.
- T1 = gain * bias * (CSF, GM, WM fractions . contrast) with Rician noise, skull-stripped.

tiv/csfv/gmv/wmv in metadata.csv are sums of the subject's own warped tissue maps times
the voxel volume (mL), so the ground truth is exact. Every draw comes from a generator
seeded by (seed, subject index): the cohort is deterministic for a seed and subject i is
the same whatever n is.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bench.errors import DataError

TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
VERSION = 2  # 2: the report's age distribution, controls only (1: gamma ages, 8% patients)
REPORT_AGE_EDGES_Y = (6.69, 10, 20, 30, 40, 50, 60, 70, 78.20)  # min, buckets, max
REPORT_BUCKET_COUNTS = (21, 152, 220, 24, 14, 9, 18, 8)  # its 466 training subjects
BIO_AGE_SD_Y = 3.0
FOV_MM = 200.0          # the template brain spans 181 mm; room for larger heads
NATIVE_SCALE = 0.92     # MNI152 is ~25% larger in volume than an average native brain
GM_PEAK_Y, WM_PEAK_Y = 6.0, 35.0
VENT_MAX_MM = 5.0
DEFORM_MM, ROT_DEG, SHIFT_MM = 3.0, 2.0, 2.0
CONTRAST = {3.0: (0.25, 0.60, 0.90), 1.5: (0.30, 0.62, 0.87)}  # CSF, GM, WM
COLUMNS = ["id", "study", "sex", "age", "site", "diagnosis", "tiv", "csfv", "gmv", "wmv",
           "magnetic_field_strength", "acquisition_setting", "age_bucket"]


@dataclass(frozen=True)
class Site:
    name: str
    field_t: float
    setting: str
    gain: float
    noise: float       # Rician sigma relative to WM intensity
    bias: float        # s.d. of the log bias field
    orientation: str   # axis codes the images are stored in


SITES = (
    Site("site-A", 3.0, "MPRAGE 1.0mm", 1.00, 0.015, 0.08, "RAS"),
    Site("site-B", 1.5, "SPGR 1.2mm", 0.80, 0.030, 0.15, "LAS"),
    Site("site-C", 3.0, "MPRAGE 0.9mm", 1.20, 0.020, 0.10, "RAS"),
    Site("site-D", 1.5, "MPRAGE 1.3mm", 0.90, 0.035, 0.12, "LPS"),
)


@dataclass(frozen=True)
class Template:
    gm: torch.Tensor            # [S,S,S] tissue fractions
    wm: torch.Tensor
    mask: torch.Tensor
    vent_dist_mm: torch.Tensor  # distance to the template ventricles (0 inside)
    vox_mm: float


def template_file(kind: str) -> Path:
    try:
        import nilearn
    except ImportError as exc:
        raise DataError("the brain simulator needs nilearn and nibabel: "
                        "pip install 'bench[brain]'") from exc
    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_FILE.format(kind)
    if not path.exists():
        raise DataError(f"MNI152 template not found at {path}; reinstall nilearn>=0.10")
    return path


def bucket(age: float) -> str:
    lo = int(age // 10) * 10
    return f"{lo}-{lo + 9}"


@functools.lru_cache(maxsize=4)
def load_template(shape: int) -> Template:
    """Template tissue fractions at `shape`^3 over a FOV_MM cube (read and pooled once)."""
    import nibabel as nib
    from scipy.ndimage import distance_transform_edt

    arr = {k: np.asarray(nib.load(template_file(k)).get_fdata(dtype=np.float32)) / 255.0  # type: ignore[attr-defined]
           for k in ("t1", "gm", "wm")}
    mask = (arr["t1"] > 0).astype(np.float32)  # the template T1 is skull-stripped
    gm, wm = arr["gm"] * mask, arr["wm"] * mask
    over = np.maximum(gm + wm, 1.0)  # 0.7% of the GM+WM mass sits where GM+WM > 1 or outside
    stack = np.stack([gm / over, wm / over, mask])
    idx = np.argwhere(mask > 0)
    centre = (idx.min(0) + idx.max(0)) // 2
    edge = int(FOV_MM)  # template voxels are 1 mm
    cube = np.zeros((3, edge, edge, edge), np.float32)
    lo = [int(c) - edge // 2 for c in centre]  # cube corner in template voxels
    src = [slice(max(a, 0), min(a + edge, n)) for a, n in zip(lo, mask.shape, strict=True)]
    dst = [slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True)]
    cube[(slice(None), *dst)] = stack[(slice(None), *src)]
    pooled = F.adaptive_avg_pool3d(torch.from_numpy(cube)[None], shape)[0]
    vox_mm = FOV_MM / shape
    m = pooled[2].numpy()
    csf = m - pooled[0].numpy() - pooled[1].numpy()
    depth_mm = distance_transform_edt(m > 0.5) * vox_mm
    vent = (csf > 0.5) & (depth_mm > 15.0)  # deep CSF: the lateral and third ventricles
    dist = distance_transform_edt(~vent) * vox_mm if vent.any() else np.full(m.shape, 1e3)
    return Template(pooled[0].contiguous(), pooled[1].contiguous(), pooled[2].contiguous(),
                    torch.from_numpy(dist.astype(np.float32)), vox_mm)


# ---------------------------------------------------------------- subjects
@functools.lru_cache(maxsize=1)
def age_quantile() -> Any:
    """Age as a function of a uniform draw: the report's bucket counts (module docstring)."""
    from scipy.interpolate import PchipInterpolator

    cdf = np.r_[0.0, np.cumsum(REPORT_BUCKET_COUNTS)] / sum(REPORT_BUCKET_COUNTS)
    return PchipInterpolator(cdf, REPORT_AGE_EDGES_Y)


def draw_subject(seed: int, i: int) -> dict[str, Any]:
    """Demographics and the scalar random draws of subject i (a generator per subject)."""
    rng = np.random.default_rng([seed, i])
    age = float(age_quantile()(rng.random()))
    sex = "F" if rng.random() < 0.5 else "M"
    site_i = int(rng.integers(len(SITES)))
    bio_age = age + rng.normal(0, BIO_AGE_SD_Y)
    growth = 1.0 - 0.02 * max(0.0, 12.0 - age) / 6.0
    scale = NATIVE_SCALE * (0.96 if sex == "F" else 1.0) * growth * (1 + 0.03 * rng.normal())
    return {"id": f"sub-{i:04d}", "age": round(age, 2), "sex": sex, "site": SITES[site_i],
            "diagnosis": "control", "bio_age": bio_age,
            "scale": scale, "rot": rng.normal(0, math.radians(ROT_DEG), 3),
            "shift_mm": rng.normal(0, SHIFT_MM, 3), "torch_seed": int(rng.integers(2**62))}


def gm_factor(age: float) -> float:
    x = max(age - GM_PEAK_Y, 0.0)
    return 1.0 - 0.0025 * x - 1.2e-5 * x * x


def wm_factor(age: float) -> float:
    d = age - WM_PEAK_Y
    return 1.0 - (1.5e-4 if d < 0 else 1.0e-4) * d * d


def vent_radius_mm(age: float) -> float:
    return VENT_MAX_MM * max((age - 6.0) / 74.0, 0.0) ** 2


def smooth_field(gen: torch.Generator, shape: int, grid: int, channels: int = 1) -> torch.Tensor:
    """Unit-s.d. noise on a grid^3 lattice, trilinearly upsampled: [channels,S,S,S]."""
    ctrl = torch.randn((1, channels, grid, grid, grid), generator=gen)
    return F.interpolate(ctrl, size=(shape,) * 3, mode="trilinear", align_corners=True)[0]


def aged_tissues(t: Template, bio_age: float, gen: torch.Generator) -> torch.Tensor:
    """GM/WM/CSF fractions [3,S,S,S] of the template after the age effects (docstring)."""
    shape = t.gm.shape[-1]
    wm = t.wm * wm_factor(bio_age)
    gm = t.gm + (t.wm - wm) if bio_age < WM_PEAK_Y else t.gm.clone()
    gm = gm * gm_factor(bio_age) * torch.exp(0.08 * smooth_field(gen, shape, 4)[0])
    gm = torch.minimum(gm, t.mask - wm).clamp_(min=0)
    q = ((vent_radius_mm(bio_age) - t.vent_dist_mm) / 2.0).clamp(0, 1)
    gm, wm = gm * (1 - q), wm * (1 - q)
    return torch.stack([gm, wm, t.mask - gm - wm])


def warp(tissues: torch.Tensor, subj: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """Scale, rotate, shift and deform the tissue maps (one grid_sample for all three).

    The sampling grid (affine + displacement) is built on a lattice of S/4 and upsampled
    trilinearly: exact for the affine part, and the displacement is smooth at 5^3 anyway;
    it saves an S^3 affine_grid and two S^3 passes (~40% of a subject's time at 96^3).
    """
    from scipy.spatial.transform import Rotation

    shape = tissues.shape[-1]
    low = max(shape // 4, 6)
    rot = torch.from_numpy(Rotation.from_rotvec(subj["rot"]).as_matrix()).float()
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = rot / subj["scale"]  # output -> template coordinates
    theta[0, :, 3] = torch.as_tensor(subj["shift_mm"], dtype=torch.float32) / (FOV_MM / 2)
    grid = F.affine_grid(theta, [1, 3, low, low, low], align_corners=True)[0]
    grid = grid + smooth_field(gen, low, 5, 3).permute(1, 2, 3, 0) * (DEFORM_MM / (FOV_MM / 2))
    grid = F.interpolate(grid.permute(3, 0, 1, 2)[None], size=(shape,) * 3, mode="trilinear",
                         align_corners=True)[0].permute(1, 2, 3, 0)
    return F.grid_sample(tissues[None], grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def t1_image(tissues: torch.Tensor, subj: dict[str, Any], gen: torch.Generator) -> np.ndarray:
    site: Site = subj["site"]
    c_csf, c_gm, c_wm = CONTRAST[site.field_t]
    c_wm -= 0.001 * max(subj["bio_age"] - 20.0, 0.0)
    shape = tissues.shape[-1]
    clean = c_gm * tissues[0] + c_wm * tissues[1] + c_csf * tissues[2]
    bias = torch.exp(site.bias * smooth_field(gen, shape, 3)[0])
    img = site.gain * bias * clean
    sigma = site.noise * site.gain
    n1, n2 = torch.randn((2, *img.shape), generator=gen) * sigma
    img = torch.sqrt((img + n1) ** 2 + n2**2)  # magnitude images have Rician noise
    return (img * (tissues.sum(0) > 0.1)).numpy()  # skull-stripped: background 0


def simulate_subject(t: Template, seed: int, i: int) -> tuple[dict[str, Any], torch.Tensor,
                                                             np.ndarray]:
    """(metadata row, warped tissue fractions [3,S,S,S] GM/WM/CSF, T1 image [S,S,S])."""
    subj = draw_subject(seed, i)
    gen = torch.Generator().manual_seed(subj["torch_seed"])
    tissues = warp(aged_tissues(t, subj["bio_age"], gen), subj, gen)
    t1 = t1_image(tissues, subj, gen)
    vox_ml = t.vox_mm**3 / 1000.0
    gmv, wmv, csfv = (float(v) * vox_ml for v in tissues.double().sum((1, 2, 3)))
    site: Site = subj["site"]
    row = {"id": subj["id"], "study": f"SIM-{site.name[-1]}", "sex": subj["sex"],
           "age": subj["age"], "site": site.name, "diagnosis": subj["diagnosis"],
           "tiv": gmv + wmv + csfv, "csfv": csfv, "gmv": gmv, "wmv": wmv,
           "magnetic_field_strength": site.field_t, "acquisition_setting": site.setting,
           "age_bucket": bucket(subj["age"])}
    return row, tissues, t1


def save_nifti(img: np.ndarray, vox_mm: float, orientation: str, path: Path) -> None:
    """RAS array -> NIfTI stored in `orientation` (uint8 with a scale factor: 1/4 the bytes)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    shape = img.shape[0]
    affine = np.diag([vox_mm, vox_mm, vox_mm, 1.0])
    affine[:3, 3] = -FOV_MM / 2 + vox_mm / 2
    nii = nib.Nifti1Image(img.astype(np.float32), affine)
    if orientation != "RAS":
        nii = nii.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(orientation)))
    nii.set_data_dtype(np.uint8)
    nii.header.set_xyzt_units("mm")
    nii.set_qform(nii.affine, code=1)
    nii.set_sform(nii.affine, code=1)
    assert nii.shape == (shape,) * 3
    nib.save(nii, str(path))


def _write_subjects(out: Path, shape: int, seed: int, ids: list[int]) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process per core beats threads inside grid_sample
    try:
        t = load_template(shape)
        rows = []
        for i in ids:
            row, _, t1 = simulate_subject(t, seed, i)
            save_nifti(t1, t.vox_mm, draw_subject(seed, i)["site"].orientation,
                       out / f"{row['id']}.nii.gz")
            rows.append(row)
        return rows
    finally:  # in-process generation must not change the trial's arithmetic after it
        torch.set_num_threads(threads)


def write_cohort(out: str | Path, n: int, shape: int = 96, seed: int = 0,
                 workers: int | None = None) -> Path:
    """Simulate `n` subjects at `shape`^3 into `out` (metadata.csv + <id>.nii.gz).

    `workers` processes (default: one per core, for cohorts of 64+ at 48^3+) each write
    every workers-th subject; the result does not depend on their number.
    """
    if n < 1 or shape < 8:
        raise DataError(f"brain-sim: need n >= 1 and shape >= 8, got n={n}, shape={shape}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 64 and shape >= 48 else 1
    parts = [list(range(k, n, workers)) for k in range(workers)]
    if workers == 1:
        results = [_write_subjects(out, shape, seed, parts[0])]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                results = list(pool.map(_write_subjects, [out] * workers, [shape] * workers,
                                        [seed] * workers, parts))
        except BrokenProcessPool as exc:
            raise DataError(
                f"brain-sim: the {workers} processes simulating the cohort died before "
                f"finishing ({exc}). If this runs from a script, guard its entry point with "
                "`if __name__ == \"__main__\":` (the processes are spawned and import it "
                "again)") from exc
    rows = sorted((r for part in results for r in part), key=lambda r: r["id"])
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out / "metadata.csv", index=False,
                                               float_format="%.6f")
    return out


def ensure_sim_cohort(root: Path, n: int, shape: int, seed: int) -> Path:
    """The simulated cohort under `root`/brain-sim, generated once (file-locked, atomic)."""
    base = root / "brain-sim"
    final = base / f"n{n}-s{shape}-seed{seed}-v{VERSION}"  # a new version: a new folder
    if (final / "metadata.csv").exists():
        return final
    import multiprocessing as mp

    if getattr(mp.current_process(), "_inheriting", False):
        # a spawned simulation process importing an unguarded script's main module, which
        # asks for the cohort again: waiting for the lock its parent holds would hang both
        raise DataError("brain-sim: the simulated cohort was requested while a spawned "
                        "process was starting; guard the script's entry point with "
                        "`if __name__ == \"__main__\":`")
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent workers wait for one writer
        if not (final / "metadata.csv").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=base))
            try:
                write_cohort(tmp, n, shape, seed)
                shutil.rmtree(final, ignore_errors=True)  # a half-written folder of a crash
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final
