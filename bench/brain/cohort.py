"""A cohort folder (metadata CSV + one NIfTI per subject) -> resident float16 volumes.

Each image is read in full (a truncated `.nii.gz` fails in the gzip stream, not at the
header), reoriented to RAS+ (`nibabel.as_closest_canonical`), normalised at its native
resolution (percentile: divide by the 99th percentile of the non-zero voxels, which maps
WM to ~1 whatever the scanner gain; zscore: over the non-zero voxels; none) and brought
to a `shape`^3 cube (resample: isotropic field of view = the longest side, area-averaged
when shrinking, trilinear when growing, then centre-padded; crop: centre crop/pad, no
interpolation).

Every problem is collected before anything is returned: one DataError lists every bad
file and row with its reason; `on_bad_file="skip"` drops them and warns with the same
list. The stacked volumes are cached as float16 `.npy` (96^3 x 600 = 1.06 GB, half of
float32), keyed on the CSV bytes, each image's size and mtime and the loading options, so
the second trial (or process) reads one file instead of 600 NIfTIs; within a process the
tensor itself is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bench.errors import DataError

CACHE_VERSION = 2  # 2: normalised at the native resolution, then resized
RESIZE_MODES = ("resample", "crop")
NORMALIZE_MODES = ("percentile", "zscore", "none")
_MEMORY: dict[str, Cohort] = {}
_SKIPS_SAID: set[tuple[str, ...]] = set()  # (folder, *bad files) this process has reported
ADDED_LATER = ("mask_channel", "moments")  # CohortSpec fields that older cache keys lack


class BadFilesWarning(UserWarning):
    """Bad files or rows were dropped (`on_bad_file=skip`)."""


@dataclass(frozen=True)
class CohortSpec:
    root: Path
    shape: int = 96
    metadata: str = "metadata.csv"
    file_pattern: str = "{id}.nii.gz"
    id_column: str = "id"
    age_column: str = "age"
    concepts: tuple[str, ...] = ("csfv", "gmv", "wmv")
    resize: str = "resample"
    normalize: str = "percentile"
    mask_channel: bool = False
    moments: int = 1

    @property
    def channels(self) -> int:
        """Channels of each volume: the image, the brain mask with `mask_channel`, then the
        mean of the image's square (and cube) with `moments` 2 (3)."""
        return self.mask_channel + self.moments

    def image_path(self, subject_id: str) -> Path:
        return self.root / self.file_pattern.format(id=subject_id)


@dataclass
class Cohort:
    meta: pd.DataFrame          # the good rows, in the order of `volumes`
    volumes: torch.Tensor       # float16 [N,C,S,S,S] on the CPU (C 2 with the mask channel)
    bad: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- one image
def resize_cube(data: np.ndarray, zooms: Sequence[float], shape: int, mode: str) -> np.ndarray:
    """A 3D array -> `shape`^3 (see the module docstring for the two modes)."""
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if mode == "resample":
        extent = [n * z for n, z in zip(data.shape, zooms, strict=True)]
        fov = max(extent)
        size = [max(1, min(shape, round(e / fov * shape))) for e in extent]
        shrink = all(s <= n for s, n in zip(size, data.shape, strict=True))
        interp = "area" if shrink else "trilinear"
        kw = {} if interp == "area" else {"align_corners": False}
        x = F.interpolate(x[None, None], size=size, mode=interp, **kw)[0, 0]
    out = torch.zeros((shape,) * 3)
    src, dst = [], []
    for n in x.shape:
        lo_src, lo_dst = max((n - shape) // 2, 0), max((shape - n) // 2, 0)
        k = min(n, shape)
        src.append(slice(lo_src, lo_src + k))
        dst.append(slice(lo_dst, lo_dst + k))
    out[tuple(dst)] = x[tuple(src)]
    return out.numpy()


def normalize(x: np.ndarray, mode: str) -> np.ndarray:
    fg = x[x > 0]
    if mode == "none" or fg.size == 0:
        return x
    if mode == "percentile":
        return x / max(float(np.percentile(fg, 99.0)), 1e-6)
    mean, sd = float(fg.mean()), float(fg.std())
    return np.where(x > 0, (x - mean) / max(sd, 1e-6), 0.0).astype(np.float32)


def load_volume(path: str | Path, shape: int, resize: str = "resample",
                norm: str = "percentile", mask_channel: bool = False,
                moments: int = 1) -> np.ndarray:
    """One NIfTI -> float32 [shape]^3 in RAS+, or [C,shape,shape,shape] with more channels:
    the image; with `mask_channel` the fraction of each voxel inside the brain (`brain_mask`
    at the native resolution, resized the same way); with `moments` k > 1 the image's
    powers 2..k at the native resolution, resized the same way (the mean of the square
    over a 6 mm voxel, beside its mean). Raises ValueError/OSError naming the problem."""
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"not a NIfTI image ({type(img).__name__})")
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)  # reads the whole stream
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{int((~np.isfinite(data)).sum())} non-finite voxels")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # Normalised before resizing: at the native resolution the 99th percentile is pure white
    # matter; after area-averaging to 32^3 (6 mm voxels) it is a partial-volume voxel whose
    # value depends on the subject's tissue mix, the very thing the CNN has to measure.
    x = normalize(data, norm)
    image = resize_cube(x, zooms, shape, resize)
    if not mask_channel and moments == 1:
        return image
    out = [image]
    if mask_channel:
        # After area-averaging a dark voxel is CSF, or brain half outside the mask: the
        # fraction inside tells them apart (measured in benchmarks/RESULTS.md, brain-age).
        out.append(resize_cube(brain_mask(data).astype(np.float32), zooms, shape, resize))
    # A voxel of fractions (c, g, w) of tissues of intensities (ic, ig, iw) has the mean
    # c*ic + g*ig + w*iw and the mean square c*ic^2 + g*ig^2 + w*iw^2 (+ the noise's
    # variance): with the mask's c + g + w, three equations for the three fractions.
    out += [resize_cube(x**k, zooms, shape, resize) for k in range(2, moments + 1)]
    return np.stack(out)


MASK_REL = 1e-3      # |value| above this fraction of the 99th percentile: inside the brain
MASK_FILL = (0.01, 0.9)  # outside: no brain left, or a background that is not 0


def brain_mask(data: np.ndarray) -> np.ndarray:
    """The skull-stripped brain: voxels whose magnitude is above MASK_REL of the image's
    99th percentile (background left over by interpolation, ~1e-45 in nilearn's 2 mm
    template, is not brain); ValueError if it is (nearly) empty or fills the image."""
    mag = np.abs(data)
    nonzero = mag[mag > 0]
    mask = mag > MASK_REL * (float(np.percentile(nonzero, 99.0)) if nonzero.size else 0.0)
    fill = float(mask.mean())
    low, high = MASK_FILL
    if not low <= fill <= high:
        what = ("the image must be skull-stripped with a background of 0" if fill > high
                else "no brain is left (a failed skull-strip?)")
        raise ValueError(f"mask_channel: {fill:.1%} of the image is above its background "
                         f"(|value| > {MASK_REL:g} x its 99th percentile); {what}: the brain "
                         f"must fill {low:.0%}-{high:.0%} of it")
    return mask


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    kind = type(exc).__name__
    if kind in ("EOFError", "BadGzipFile") or "end-of-stream" in (text[0] if text else ""):
        return f"truncated or corrupt gzip stream ({kind}: {text[0] if text else ''})"
    if kind == "ImageFileError":
        return f"not a readable NIfTI file (nibabel: {text[0] if text else ''})"
    return f"{kind}: {text[0] if text else ''}"


# ---------------------------------------------------------------- the folder
def read_metadata(spec: CohortSpec) -> pd.DataFrame:
    path = spec.root / spec.metadata
    if not spec.root.is_dir():
        raise DataError(f"cohort folder {spec.root} does not exist")
    if not path.exists():
        raise DataError(f"cohort {spec.root}: metadata file {spec.metadata!r} not found; "
                        f"files there: {', '.join(sorted(os.listdir(spec.root))[:10])}")
    meta = pd.read_csv(path, dtype={spec.id_column: str})
    need = [spec.id_column, spec.age_column, *spec.concepts]
    missing = [c for c in need if c not in meta.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"columns: {', '.join(meta.columns)}")
    return meta


def row_problems(spec: CohortSpec, meta: pd.DataFrame) -> dict[int, str]:
    """Problems found without reading images: NaN targets, duplicate ids, absent files."""
    out: dict[int, str] = {}
    seen: set[str] = set()
    for i, row in meta.iterrows():
        sid = row[spec.id_column]
        where = f"{spec.metadata} row {int(i) + 2} (id {sid})"  # +2: header, 1-based
        nan = [c for c in (spec.age_column, *spec.concepts)
               if not _finite(row[c])]
        if not isinstance(sid, str) or not sid:
            out[int(i)] = f"{where}: empty id"
        elif sid in seen:
            out[int(i)] = f"{where}: duplicate id"
        elif nan:
            out[int(i)] = f"{where}: NaN or non-numeric value in {', '.join(nan)}"
        elif not spec.image_path(sid).exists():
            out[int(i)] = f"{where}: metadata row without an image ({spec.image_path(sid)})"
        seen.add(sid if isinstance(sid, str) else "")
    return out


def _finite(v: object) -> bool:
    try:
        return math.isfinite(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def orphan_images(spec: CohortSpec, meta: pd.DataFrame) -> list[str]:
    """Images matching the pattern that no metadata row names."""
    pattern = spec.file_pattern.replace("{id}", "*")
    known = {spec.image_path(str(s)).resolve() for s in meta[spec.id_column]}
    return [f"{p}: image without a metadata row" for p in sorted(spec.root.glob(pattern))
            if p.resolve() not in known]


def cache_key(spec: CohortSpec, meta_bytes: bytes, meta: pd.DataFrame) -> str:
    fields = asdict(spec)
    for name in ADDED_LATER:  # at its default: the key (and file) of a cohort read before it
        if fields[name] == CohortSpec.__dataclass_fields__[name].default:
            del fields[name]
    h = hashlib.sha256(json.dumps({**fields, "root": str(spec.root.resolve()),
                                   "v": CACHE_VERSION}, sort_keys=True).encode())
    h.update(meta_bytes)
    for sid in meta[spec.id_column].astype(str):
        p = spec.image_path(sid)
        st = p.stat() if p.exists() else None
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "-"
        h.update(f"{sid}:{stamp}".encode())
    h.update("|".join(orphan_images(spec, meta)).encode())
    return h.hexdigest()[:20]


def cache_dir(spec: CohortSpec) -> Path:
    """The preprocessed-cohort cache: $BENCH_CACHE/brain-cache (the cache key names the
    cohort's folder, so one folder serves every cohort). Never inside the cohort: data
    folders are often shared and read-only."""
    from bench.data import cache_root

    folder = cache_root() / "brain-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_all(spec: CohortSpec, paths: list[Path]) -> tuple[np.ndarray, dict[int, str]]:
    """Read images on a few threads (gzip inflation releases the GIL)."""
    vols = np.zeros((len(paths), spec.channels, *(spec.shape,) * 3), np.float16)
    bad: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            vols[i] = load_volume(paths[i], spec.shape, spec.resize, spec.normalize,
                                  spec.mask_channel, spec.moments).reshape(vols.shape[1:])
        except Exception as exc:  # every reason is reported, none stops the others
            bad[i] = f"{paths[i]}: {_reason(exc)}"

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return vols, bad


def _build(spec: CohortSpec, meta: pd.DataFrame) -> tuple[np.ndarray, list[int], list[str]]:
    problems = row_problems(spec, meta)
    todo = [i for i in range(len(meta)) if i not in problems]
    paths = [spec.image_path(str(meta.iloc[i][spec.id_column])) for i in todo]
    vols, bad_img = _read_all(spec, paths)
    keep = [k for k in range(len(todo)) if k not in bad_img]
    bad = [problems[i] for i in sorted(problems)] + [bad_img[k] for k in sorted(bad_img)]
    bad += orphan_images(spec, meta)
    if len(keep) < len(todo):
        vols = vols[keep]  # a copy only when something was dropped (1 GB at 96^3 x 600)
    return vols, [todo[k] for k in keep], bad


def load_cohort(spec: CohortSpec, on_bad_file: str = "error") -> Cohort:
    """The cohort's good subjects; DataError listing every bad one unless `skip`."""
    if on_bad_file not in ("error", "skip"):
        raise DataError(f"on_bad_file: must be error or skip, got {on_bad_file!r}")
    for name, val, allowed in (("resize", spec.resize, RESIZE_MODES),
                               ("normalize", spec.normalize, NORMALIZE_MODES)):
        if val not in allowed:
            raise DataError(f"{name}: must be one of {', '.join(allowed)}, got {val!r}")
    meta = read_metadata(spec)
    key = cache_key(spec, (spec.root / spec.metadata).read_bytes(), meta)
    cohort = _MEMORY.get(key) or _from_disk(spec, meta, key)
    if cohort is None:
        vols, rows, bad = _build(spec, meta)
        cohort = Cohort(meta.iloc[rows].reset_index(drop=True), torch.from_numpy(vols), bad)
        _to_disk(spec, key, vols, rows, bad)
    _MEMORY[key] = cohort
    if cohort.bad:
        listing = "\n  ".join(cohort.bad)
        if on_bad_file == "error":
            raise DataError(f"cohort {spec.root}: {len(cohort.bad)} bad file(s)/row(s) "
                            f"(set on_bad_file=skip to drop them):\n  {listing}")
        said = (str(spec.root), *cohort.bad)  # once a process: not again for each trial,
        if said not in _SKIPS_SAID:  # nor for each shape or channel set of one folder
            _SKIPS_SAID.add(said)
            warnings.warn(f"cohort {spec.root}: skipped {len(cohort.bad)} bad file(s)/row(s):"
                          f"\n  {listing}", BadFilesWarning, stacklevel=2)
    if len(cohort.meta) == 0:
        raise DataError(f"cohort {spec.root}: no usable subject")
    return cohort


def _from_disk(spec: CohortSpec, meta: pd.DataFrame, key: str) -> Cohort | None:
    folder = cache_dir(spec)
    npy, js = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.exists() and js.exists()):
        return None
    info = json.loads(js.read_text())
    vols = np.load(npy)
    if vols.ndim == 4:  # one channel, stored without the channel axis: [N,S,S,S]
        vols = vols[:, None]
    if vols.shape[1:] != (spec.channels, *(spec.shape,) * 3):
        return None  # not what this key should hold: built again
    return Cohort(meta.iloc[info["rows"]].reset_index(drop=True),
                  torch.from_numpy(vols), info["bad"])


def _to_disk(spec: CohortSpec, key: str, vols: np.ndarray, rows: list[int],
             bad: list[str]) -> None:
    """Best effort, atomic: a temporary name then os.replace (readers never see half)."""
    try:
        folder = cache_dir(spec)
        tmp = folder / f".{key}.{os.getpid()}.npy"
        # one channel: stored [N,S,S,S], as before the channel axis, so that older
        # versions sharing this cache folder read it too
        np.save(tmp, vols[:, 0] if vols.shape[1] == 1 else vols)
        os.replace(tmp, folder / f"{key}.npy")
        tmpj = folder / f".{key}.{os.getpid()}.json"
        tmpj.write_text(json.dumps({"rows": rows, "bad": bad}))
        os.replace(tmpj, folder / f"{key}.json")
    except OSError as exc:
        warnings.warn(f"cohort cache not written ({exc})", stacklevel=3)
