"""How much of the tissue volumes a linear model reads from 32^3 per-voxel channels.

An independent probe (numpy, scipy and scikit-learn; not the task's code): for each
subject of the simulated cohort, the normalised image at its native resolution, its brain
mask and the image's square and cube are area-averaged to 32^3; the per-voxel monomials
(degree <= 3) of a set of those channels are summed over the brain, or within depth
shells of it (3^3 erosion, as `net=shell_ridge` does, but by scipy). A ridge per volume,
fitted on a random 75% (alpha by leave-one-out), predicts the other 25%'s volumes; kernel
ridge, tuned by 5-fold CV, maps the true training volumes to age and is scored on the
predicted test volumes (the task's independent mode). Table: benchmarks/RESULTS.md,
brain-age, "a closed-form model".

Usage: python benchmarks/brain_age_probe.py COHORT_FOLDER   (metadata.csv + NIfTIs)
"""

import itertools
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.brain.cohort import brain_mask, normalize

SETS = {"mean, brain fraction": (0, 1), "+ mean square": (0, 1, 2),
        "+ mean cube": (0, 1, 2, 3), "+ 3 depth shells": (0, 1, 2, 3)}


def area(x: np.ndarray, size: int = 32) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
    return F.interpolate(t, size=(size,) * 3, mode="area")[0, 0].numpy()


def features(path: Path) -> dict[str, list[float]]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    x = normalize(data, "percentile")
    ch = [area(x), area(brain_mask(data).astype(np.float32)), area(x**2), area(x**3)]
    brain = ch[1] > 0.5
    e1 = ndimage.binary_erosion(brain, np.ones((3, 3, 3)))
    e2 = ndimage.binary_erosion(e1, np.ones((3, 3, 3)))
    out = {}
    for name, use in SETS.items():
        shells = [brain & ~e1, e1 & ~e2, e2] if "shells" in name else [ch[1] > 0]
        monos = [np.prod([ch[i] for i in c], axis=0) for k in (1, 2, 3)
                 for c in itertools.combinations_with_replacement(use, k)]
        out[name] = [float((m * s).sum()) for s in shells for m in monos]
    return out


def main() -> None:
    root = Path(sys.argv[1])
    meta = pd.read_csv(root / "metadata.csv", dtype={"id": str})
    rows = [features(root / f"{sid}.nii.gz") for sid in meta["id"]]
    age, vols = meta["age"].to_numpy(), meta[["csfv", "gmv", "wmv"]].to_numpy()
    order = np.random.default_rng(0).permutation(len(age))
    test, train = order[: len(age) // 4], order[len(age) // 4:]
    print(f"mean-age predictor: {np.abs(age[train].mean() - age[test]).mean():.2f} y")
    sc = StandardScaler().fit(vols[train])
    grid = {"alpha": np.logspace(-3, 0, 6), "gamma": np.logspace(-2, 0.5, 8)}
    reg = GridSearchCV(KernelRidge(kernel="rbf"), grid, cv=5,
                       scoring="neg_mean_absolute_error").fit(sc.transform(vols[train]),
                                                              age[train])
    for name in SETS:
        X = np.array([r[name] for r in rows])
        pred = np.zeros_like(vols)
        for j in range(3):
            m = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-6, 3, 20)))
            pred[test, j] = m.fit(X[train], vols[train, j]).predict(X[test])
        r = [np.corrcoef(pred[test, j], vols[test, j])[0, 1] for j in range(3)]
        mae = np.abs(reg.predict(sc.transform(pred[test])) - age[test]).mean()
        print(f"{name:22s} csf/gm/wm r {r[0]:.3f} / {r[1]:.3f} / {r[2]:.3f}   "
              f"age test MAE {mae:.2f} y")


if __name__ == "__main__":
    main()
