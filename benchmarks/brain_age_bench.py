"""brain-age benchmarks: input-pipeline epoch time, and the MAE of each hypothesis.

1. Epoch time of the baseline CNN (1 conv layer, 2 channels, max-pool, linear head) on one
   cohort, side by side in one process: resident float16 volumes with index-slice batches
   (the task's path) vs a per-sample NIfTI `Dataset` + `DataLoader` that reads, reorients,
   resamples and normalises every image every epoch (the usual PyTorch baseline). Also the
   cohort's first load (every NIfTI read, cache written) vs a cached load (.npy).
2. Test MAE (years) of each variant in search_spaces/brain_age.yaml on the simulated
   cohort, mean +- std over seeds, against the mean-age predictor (train-split mean).

    python benchmarks/brain_age_bench.py --cohort DIR --shape 96 --part epoch
    python benchmarks/brain_age_bench.py --cohort DIR --shape 48 --epochs 20 --part mae

Prints Markdown for benchmarks/RESULTS.md and writes a JSON of the raw figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.brain import cohort as cohort_mod
from bench.brain.cohort import CohortSpec, load_cohort, load_volume
from bench.registry import get_task
from bench.space import load_space, merge_params, parse_overrides, space_path
from bench.tasks import brain_age as ba
from bench.trial import local_context


def baseline_params(shape: int, cohort: Path) -> dict[str, Any]:
    task = get_task("brain-age")
    return {**task.defaults, "cohort": str(cohort), "shape": shape, "batch_size": 16}


class NiftiDataset(torch.utils.data.Dataset):
    """One NIfTI read per item: the per-sample baseline."""

    def __init__(self, paths: list[Path], targets: np.ndarray, shape: int):
        self.paths, self.targets, self.shape = paths, targets, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        vol = load_volume(self.paths[i], self.shape)
        return torch.from_numpy(vol)[None], torch.as_tensor(self.targets[i], dtype=torch.float32)


def epoch_resident(params: dict[str, Any], vols: torch.Tensor, y: torch.Tensor,
                   device: torch.device) -> float:
    torch.manual_seed(0)
    model = ba.build_model(params, 3, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    idx = torch.arange(len(vols), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    ba.train_epoch(model, opt, ba.device_volumes(vols, device), idx, y.to(device), params, gen)
    return time.perf_counter() - t0


def epoch_dataloader(params: dict[str, Any], paths: list[Path], y: np.ndarray,
                     device: torch.device, workers: int) -> float:
    torch.manual_seed(0)
    model = ba.build_model(params, 3, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(NiftiDataset(paths, y, int(params["shape"])),
                                         batch_size=int(params["batch_size"]), shuffle=True,
                                         num_workers=workers)
    t0 = time.perf_counter()
    model.train()
    for x, t in loader:
        x, t = x.to(device), t.to(device)
        loss = torch.nn.functional.mse_loss(model(x), t[:, :3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def part_epoch(args: argparse.Namespace) -> dict[str, Any]:
    params = baseline_params(args.shape, args.cohort)
    spec = CohortSpec(args.cohort, args.shape)
    for f in (args.cohort / ".bench_cache").glob("*"):
        f.unlink()  # a cold first load
    t0 = time.perf_counter()
    cohort = load_cohort(spec)
    cold_s = time.perf_counter() - t0
    cohort_mod._MEMORY.clear()
    t0 = time.perf_counter()
    cohort = load_cohort(spec)
    warm_s = time.perf_counter() - t0
    n = min(len(cohort.meta), args.n or len(cohort.meta))  # the first n subjects
    meta, vols = cohort.meta.iloc[:n], cohort.volumes[:n]
    c = meta[["csfv", "gmv", "wmv"]].to_numpy(float)
    y = (c - c.min(0)) / np.ptp(c, 0)
    y_t = torch.as_tensor(np.column_stack([y, np.zeros(n)]), dtype=torch.float32)
    paths = [spec.image_path(str(s)) for s in meta["id"]]
    dev = torch.device(args.device)
    out: dict[str, Any] = {"n": n, "shape": args.shape, "cold_load_s": cold_s,
                           "cached_load_s": warm_s, "resident_epoch_s": [], "loader": {}}
    log(f"loads: first {cold_s:.1f} s, cached {warm_s:.1f} s; n={n}")
    for _ in range(args.repeats):
        out["resident_epoch_s"].append(epoch_resident(params, vols, y_t, dev))
        log(f"resident epoch {out['resident_epoch_s'][-1]:.1f} s")
        for w in args.loader_workers:
            out["loader"].setdefault(w, []).append(epoch_dataloader(params, paths, y, dev, w))
            log(f"DataLoader({w} workers) epoch {out['loader'][w][-1]:.1f} s")
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Parameters that only the regressor reads: in independent mode the CNN is trained on the
# true volumes alone, so two configs that differ only in these train the identical CNN.
REGRESSOR_KEYS = ("regressor", "mlp_", "kr_", "ridge_")


def cnn_key(params: dict[str, Any]) -> tuple | None:
    if params["model"] != "bottleneck" or params["mode"] != "independent":
        return None
    return tuple(sorted((k, repr(v)) for k, v in params.items()
                        if not k.startswith(REGRESSOR_KEYS)))


def run_config(params: dict[str, Any], seeds: int, label: str,
               out_dir: Path) -> list[dict[str, Any]]:
    """The task's own objective, once per seed; each run keeps its predictions.csv."""
    task = get_task("brain-age")
    res = []
    slug = "".join(ch if ch.isalnum() else "-" for ch in label)
    for seed in range(seeds):
        ctx = local_context(seed, "cpu", out_dir / slug / str(seed), "val_mae")
        t0 = time.perf_counter()
        metrics = dict(task.objective(params, ctx))
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["predictions"] = str(ctx.artifact_dir / "predictions.csv")
        res.append(metrics)
        log(f"  {label} seed {seed}: test_mae {metrics['test_mae']:.2f} "
            f"({metrics['wall_s']:.0f} s)")
    return res


def rescore(params: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refit `params`' regressor on the true training volumes and score it on the CNN volumes
    that `runs` (independent-mode trials of the same CNN) saved for val and test: what the
    objective computes for `params`, without training the identical CNN again."""
    from bench.brain.models import make_regressor

    cohort = ba.load_data(params, None)
    meta = cohort.meta
    concepts = ba.concept_names(params)
    sp = ba.make_splits(meta, params)
    c_tr = meta[concepts].to_numpy(float)[sp["train"]]
    a_tr = meta[params["age_column"]].to_numpy(float)[sp["train"]]
    sc = ba.Scaler(c_tr, a_tr)
    out = []
    for seed, run in enumerate(runs):
        pred = pd.read_csv(run["predictions"])
        reg = make_regressor(params, seed).fit(sc.concepts(c_tr), sc.age(a_tr))
        m = {k: v for k, v in run.items()
             if k.startswith("concept_mae_") or k == "test_mae_mean_predictor"}
        for split in ("val", "test"):
            part = pred[pred["split"] == split]
            c_hat = part[[f"{c}_pred" for c in concepts]].to_numpy(float)
            age = sc.age_back(np.asarray(reg.predict(sc.concepts(c_hat)), float))
            m.update(ba.age_metrics(age, part["age"].to_numpy(float), split))
        out.append(m)
    return out


def part_mae(args: argparse.Namespace) -> dict[str, Any]:
    task = get_task("brain-age")
    space = load_space(space_path("brain-age"))
    over = {"cohort": str(args.cohort), "shape": args.shape, "epochs": args.epochs,
            **parse_overrides(args.set, task)}
    out: dict[str, Any] = {}
    trained: dict[tuple, list[dict[str, Any]]] = {}  # cnn_key -> its runs

    def evaluate(params: dict[str, Any], label: str, seeds: int) -> list[dict[str, Any]]:
        key = cnn_key(params)
        if key is not None and key in trained and len(trained[key]) >= seeds:
            log(f"  {label}: the same CNN as an earlier run, regressor refitted")
            return rescore(params, trained[key][:seeds])
        runs = run_config(params, seeds, label, args.out)
        if key is not None:
            trained[key] = runs
        return runs

    for name, var in space.variants.items():
        if args.variants and name not in args.variants:
            continue
        t0 = time.perf_counter()
        if var.enumerated:
            for point in var.points():
                label = name + "".join(f" {k}={v}" for k, v in point.items())
                out[label] = evaluate(merge_params(task, space, var, point, over), label,
                                      args.seeds)
        else:  # a random search over the variant's params, best by mean val_mae
            rng = np.random.default_rng(0)
            trials = []
            for _ in range(args.search_trials):
                point = {k: float(np.exp(rng.uniform(np.log(p.low), np.log(p.high))))
                         for k, p in var.params.items()}
                runs = evaluate(merge_params(task, space, var, point, over), name, args.seeds)
                trials.append((runs, point))
            runs, point = min(trials, key=lambda t: statistics.mean(r["val_mae"] for r in t[0]))
            out[f"{name} best of {args.search_trials}: "
                + ", ".join(f"{k}={v:.3g}" for k, v in point.items())] = runs
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return out


def part_oracle(args: argparse.Namespace) -> dict[str, Any]:
    """The bottleneck's ceiling: each regressor fitted and tested on the TRUE volumes; and
    the 5-fold CV grid on the training split that chose kernel ridge's default alpha/gamma."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV, KFold

    from bench.brain.models import make_regressor

    task = get_task("brain-age")
    meta = pd.read_csv(args.cohort / "metadata.csv", dtype={"id": str})
    sp = ba.make_splits(meta, task.defaults)
    c, a = meta[["csfv", "gmv", "wmv"]].to_numpy(float), meta["age"].to_numpy(float)
    sc = ba.Scaler(c[sp["train"]], a[sp["train"]])
    x_tr, y_tr = sc.concepts(c[sp["train"]]), sc.age(a[sp["train"]])
    out: dict[str, Any] = {"mean-age predictor": [{
        "test_mae": float(np.abs(a[sp["test"]] - a[sp["train"]].mean()).mean())}]}
    for name, extra in (("mlp", {}), ("ridge", {}), ("kernel_ridge", {}),
                        ("kernel_ridge", {"kr_alpha": 1.0, "kr_gamma": 1.0})):
        reg = make_regressor({**task.defaults, "regressor": name, **extra}, 0).fit(x_tr, y_tr)
        pred = sc.age_back(np.asarray(reg.predict(sc.concepts(c[sp["test"]]))))
        label = name + "".join(f" {k}={v}" for k, v in extra.items())
        out[f"{label} on true volumes"] = [{"test_mae": float(np.abs(pred - a[sp["test"]])
                                                              .mean())}]
    grid = {"alpha": [1e-3, 1e-2, 0.1, 1.0, 10.0], "gamma": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]}
    cv = GridSearchCV(KernelRidge(kernel="rbf"), grid, scoring="neg_mean_absolute_error",
                      cv=KFold(5, shuffle=True, random_state=0)).fit(x_tr, y_tr)
    for p, score in zip(cv.cv_results_["params"], cv.cv_results_["mean_test_score"],
                        strict=True):
        out[f"kernel_ridge alpha={p['alpha']:g} gamma={p['gamma']:g}: 5-fold CV MAE, train "
            "split"] = [{"test_mae": -float(score) * sc.sd}]
    return out


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} +- {statistics.stdev(xs):.2f}"


def report_epoch(r: dict[str, Any]) -> str:
    res = statistics.mean(r["resident_epoch_s"])
    lines = [f"epoch of the baseline CNN, n={r['n']} at {r['shape']}^3, batch 16, "
             f"{len(r['resident_epoch_s'])} repeats:", "",
             "| input pipeline | epoch (s) | volumes/s | vs resident |", "|---|---|---|---|",
             f"| resident float16, index slices | {fmt(r['resident_epoch_s'])} | "
             f"{r['n'] / res:.1f} | 1.00 |"]
    for w, ts in r["loader"].items():
        m = statistics.mean(ts)
        lines.append(f"| NIfTI Dataset + DataLoader, {w} workers | {fmt(ts)} | "
                     f"{r['n'] / m:.1f} | {m / res:.2f}x the time |")
    lines += ["", f"cohort load: first (every NIfTI read, cache written) {r['cold_load_s']:.1f} s;"
              f" cached (.npy) {r['cached_load_s']:.1f} s"]
    return "\n".join(lines)


def report_mae(r: dict[str, Any]) -> str:
    lines = ["| variant | test MAE (y) | val MAE (y) | test R^2 | concept MAE csf / gm / wm (mL) "
             "| mean-age predictor (y) | n seeds |", "|---|---|---|---|---|---|---|"]
    for name, runs in r.items():
        concept = " / ".join(fmt([m[k] for m in runs]) for k in
                             ("concept_mae_csfv", "concept_mae_gmv", "concept_mae_wmv")
                             if k in runs[0])
        lines.append(f"| {name} | {fmt([m['test_mae'] for m in runs])} | "
                     f"{fmt([m['val_mae'] for m in runs])} | "
                     f"{fmt([m['test_r2'] for m in runs])} | {concept} | "
                     f"{fmt([m['test_mae_mean_predictor'] for m in runs])} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--shape", type=int, default=96)
    ap.add_argument("--part", choices=("epoch", "mae", "oracle"), required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, help="epoch part: time the first n subjects only")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--search-trials", type=int, default=8)
    ap.add_argument("--variants", nargs="+", help="mae part: only these variants")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="mae part: a task parameter for every run, as `bench run --set`")
    ap.add_argument("--out", type=Path, default=Path("/tmp/brain-age-bench"),
                    help="mae part: each run's artifacts (predictions.csv)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    parts = {"epoch": part_epoch, "mae": part_mae, "oracle": part_oracle}
    result = parts[args.part](args)
    print(f"host: {host}; torch {torch.__version__}")
    if args.part == "epoch":
        print(report_epoch(result))
    elif args.part == "mae":
        print(report_mae(result))
    else:
        print("\n".join(f"| {k} | {v[0]['test_mae']:.2f} |" for k, v in result.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
