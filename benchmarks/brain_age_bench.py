"""brain-age benchmarks: input-pipeline epoch time, and the MAE of each hypothesis.

1. Epoch time of the baseline CNN (1 conv layer, 2 channels, max-pool, linear head) on one
   cohort, side by side in one process: resident float16 volumes with index-slice batches
   (the task's path) vs a per-sample NIfTI `Dataset` + `DataLoader` that reads, reorients,
   resamples and normalises every image every epoch (the usual PyTorch baseline). Also the
   cohort's first load (every NIfTI read, cache written) vs a cached load (.npy).
2. Test MAE (years) of each variant in search_spaces/brain_age.yaml, mean +- std over
   seeds, beside the mean-age predictor (train-split mean) and the report's own number
   (the variant's `reference:`), with each concept's test Pearson r.
3. The bottleneck's ceiling: each regressor fitted and tested on the TRUE volumes.
4. A probe of the images, independent of any CNN: how well each volume is predicted from
   the intensity histogram of the image as loaded (shape, normalisation).

Without `--cohort` the task's simulated cohort (its defaults: 622 subjects, the report's
age distribution) is generated at `--shape` under the data root and used.

    python benchmarks/brain_age_bench.py --cohort DIR --shape 96 --part epoch
    python benchmarks/brain_age_bench.py --shape 32 --seeds 3 --part mae --variants baseline
    python benchmarks/brain_age_bench.py --shape 32 --part oracle

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
from bench.brain.evaluation import age_metrics
from bench.lifecycle import train
from bench.registry import get_task
from bench.space import load_space, merge_params, parse_overrides, space_path
from bench.tasks import brain_age as ba
from bench.trial import local_context


def baseline_params(shape: int, cohort: Path | None) -> dict[str, Any]:
    task = get_task("brain-age")
    return {**task.defaults, "cohort": None if cohort is None else str(cohort),
            "shape": shape, "batch_size": 16}


def cohort_folder(args: argparse.Namespace) -> Path:
    """--cohort, else the task's simulated cohort (generated once at `sim_shape` from
    --set, else at --shape; the loader brings it to --shape)."""
    if args.cohort is not None:
        return Path(args.cohort)
    from bench.brain.sim import ensure_sim_cohort
    from bench.data import data_root

    task = get_task("brain-age")
    params = {**task.defaults, **parse_overrides(args.set, task)}
    return ensure_sim_cohort(data_root(), int(params["sim_n"]),
                             int(params["sim_shape"] or args.shape), int(params["sim_seed"]))


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
    folder = cohort_folder(args)
    params = baseline_params(args.shape, folder)
    spec = CohortSpec(folder, args.shape)
    for f in cohort_mod.cache_dir(spec).glob("*"):
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


def run_config(params: dict[str, Any], seeds: int, label: str, out_dir: Path,
               device: str = "cpu") -> list[dict[str, Any]]:
    """The task's own trial (train, then test), once per seed; each run keeps its
    predictions.csv and metrics.json, which a rerun with the same parameters reuses."""
    from bench.lifecycle import config_hash

    task = get_task("brain-age")
    res = []
    slug = "".join(ch if ch.isalnum() else "-" for ch in label)
    key = config_hash("brain-age", params)
    for seed in range(seeds):
        ctx = local_context(seed, device, out_dir / slug / str(seed), "val_mae")
        saved = ctx.artifact_dir / "metrics.json"
        if saved.exists() and json.loads(saved.read_text()).get("config_hash") == key:
            res.append(json.loads(saved.read_text())["metrics"])
            log(f"  {label} seed {seed}: reused {saved}")
            continue
        t0 = time.perf_counter()
        metrics: dict[str, Any] = dict(train(task, params, ctx, evaluate=True))
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["predictions"] = str(ctx.artifact_dir / "predictions.csv")
        saved.write_text(json.dumps({"config_hash": key, "metrics": metrics}))
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
    sc = ba.Scaler(c_tr, a_tr, params["concept_scaling"])
    out = []
    for seed, run in enumerate(runs):
        pred = pd.read_csv(run["predictions"])
        reg = make_regressor(params, seed).fit(sc.concepts(c_tr), sc.age(a_tr))
        m = {k: v for k, v in run.items() if k.startswith(("concept_", "val_concept_"))
             or k.endswith("_mean_predictor")}
        for split in ("val", "test"):
            part = pred[pred["split"] == split]
            c_hat = part[[f"{c}_pred" for c in concepts]].to_numpy(float)
            age = sc.age_back(np.asarray(reg.predict(sc.concepts(c_hat)), float))
            m.update(age_metrics(age, part["age"].to_numpy(float), split))
        val = pred[pred["split"] == "val"]
        age = sc.age_back(np.asarray(reg.predict(sc.concepts(val[concepts].to_numpy(float)))))
        m["val_mae_true_concepts"] = float(np.abs(age - val["age"].to_numpy(float)).mean())
        out.append(m)
    return out


def part_mae(args: argparse.Namespace) -> dict[str, Any]:
    task = get_task("brain-age")
    space = load_space(space_path("brain-age"))
    over = {"cohort": str(cohort_folder(args)), "shape": args.shape,
            **parse_overrides(args.set, task)}
    out: dict[str, Any] = {}
    trained: dict[tuple, list[dict[str, Any]]] = {}  # cnn_key -> its runs

    def evaluate(params: dict[str, Any], label: str, seeds: int) -> list[dict[str, Any]]:
        key = cnn_key(params)
        if key is not None and key in trained and len(trained[key]) >= seeds:
            log(f"  {label}: the same CNN as an earlier run, regressor refitted")
            return rescore(params, trained[key][:seeds])
        runs = run_config(params, seeds, label, args.out, args.device)
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
            metric = var.metric or space.metric  # h3: the regressor alone, as the report
            runs, point = min(trials, key=lambda t: statistics.mean(r[metric] for r in t[0]))
            out[f"{name} best of {args.search_trials}: "
                + ", ".join(f"{k}={v:.3g}" for k, v in point.items())] = runs
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return out


def part_oracle(args: argparse.Namespace) -> dict[str, Any]:
    """The bottleneck's ceiling: each regressor fitted and tested on the TRUE volumes (the
    report's settings, and standardised volumes); and a 5-fold CV grid of kernel ridge on
    the training split, which reaches the report's H3 optimum (alpha 0.001, gamma 0.02)."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV, KFold

    from bench.brain.models import make_regressor

    task = get_task("brain-age")
    meta = pd.read_csv(cohort_folder(args) / "metadata.csv", dtype={"id": str})
    sp = ba.make_splits(meta, task.defaults)
    c, a = meta[["csfv", "gmv", "wmv"]].to_numpy(float), meta["age"].to_numpy(float)
    out: dict[str, Any] = {"mean-age predictor": [{
        "test_mae": float(np.abs(a[sp["test"]] - a[sp["train"]].mean()).mean())}]}
    configs: tuple[tuple[str, dict[str, float]], ...] = (("mlp", {}), ("kernel_ridge", {}),
               ("kernel_ridge", {"kr_alpha": 0.001, "kr_gamma": 0.02}), ("ridge", {}))
    for scaling in ("minmax", "zscore"):
        sc = ba.Scaler(c[sp["train"]], a[sp["train"]], scaling)
        x_tr, y_tr = sc.concepts(c[sp["train"]]), sc.age(a[sp["train"]])
        for name, extra in configs:
            reg = make_regressor({**task.defaults, "regressor": name, **extra}, 0).fit(x_tr, y_tr)
            pred = sc.age_back(np.asarray(reg.predict(sc.concepts(c[sp["test"]]))))
            label = name + "".join(f" {k}={v}" for k, v in extra.items())
            out[f"{label} on true volumes ({scaling})"] = [
                {"test_mae": float(np.abs(pred - a[sp["test"]]).mean())}]
    sc = ba.Scaler(c[sp["train"]], a[sp["train"]])
    x_tr, y_tr = sc.concepts(c[sp["train"]]), sc.age(a[sp["train"]])
    grid = {"alpha": [1e-3, 1e-2, 0.1, 1.0], "gamma": [0.02, 0.1, 0.3, 1.0, 3.0, 10.0]}
    cv = GridSearchCV(KernelRidge(kernel="rbf"), grid, scoring="neg_mean_absolute_error",
                      cv=KFold(5, shuffle=True, random_state=0)).fit(x_tr, y_tr)
    for p, score in zip(cv.cv_results_["params"], cv.cv_results_["mean_test_score"],
                        strict=True):
        out[f"kernel_ridge alpha={p['alpha']:g} gamma={p['gamma']:g}: 5-fold CV MAE, train "
            "split (minmax)"] = [{"test_mae": -float(score) * sc.sd}]
    return out


def part_probe(args: argparse.Namespace) -> dict[str, Any]:
    """How much of each volume the loaded images carry, independently of any CNN: ridge
    regression (5-fold CV over all subjects) from each image's intensity histogram (59 bins
    in (0.02, 1.5]) plus its voxel count, sum and sum of squares. A volume the histogram
    predicts well is one a voxel-counting head can learn; spatial models can do better."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    task = get_task("brain-age")
    params = {**task.defaults, "shape": args.shape, **parse_overrides(args.set, task),
              "cohort": str(cohort_folder(args))}
    cohort = ba.load_data(params, None)
    vols = cohort.volumes[:, 0].float().numpy().reshape(len(cohort.meta), -1)
    bins = np.linspace(0.02, 1.5, 60)
    feats = np.stack([np.r_[np.histogram(v, bins)[0], (v > 0).sum(), v.sum(), (v**2).sum()]
                      for v in vols]).astype(float)
    x = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    out: dict[str, Any] = {}
    for name in ("csfv", "gmv", "wmv", "age"):
        y = cohort.meta[name].to_numpy(float)
        pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x, y,
                                 cv=KFold(5, shuffle=True, random_state=0))
        out[f"{name}: histogram ridge, 5-fold CV r ({params['normalize']}, {args.shape}^3)"] = \
            [{"test_mae": float(np.corrcoef(pred, y)[0, 1])}]
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


def reference_value(label: str, metric: str) -> str:
    """The report's number for `metric` in the `reference:` of the variant `label` names."""
    from bench.reference import Reference

    var = load_space(space_path("brain-age")).variants.get(label.split(" ")[0])
    ref = getattr(var, "reference", None)
    if not isinstance(ref, Reference):
        return ""
    hits = [v["value"] for v in ref.values if v.get("metric", ref.metric) == metric]
    return f"{hits[0]:g}" if hits else ""


def report_mae(r: dict[str, Any]) -> str:
    lines = ["| variant | test MAE (y) | report's test MAE | val MAE (y) | report's val MAE | "
             "regressor on true volumes, val (y) | report's | mean-age predictor, test (y) | "
             "concept r csf / gm / wm, test | n seeds |", "|---" * 10 + "|"]
    for name, runs in r.items():
        concept = " / ".join(fmt([m[k] for m in runs]) for k in
                             ("concept_r_csfv", "concept_r_gmv", "concept_r_wmv")
                             if k in runs[0])
        true_concepts = fmt([m["val_mae_true_concepts"] for m in runs]) \
            if "val_mae_true_concepts" in runs[0] else ""
        lines.append(f"| {name} | {fmt([m['test_mae'] for m in runs])} | "
                     f"{reference_value(name, 'test_mae')} | "
                     f"{fmt([m['val_mae'] for m in runs])} | "
                     f"{reference_value(name, 'val_mae')} | {true_concepts} | "
                     f"{reference_value(name, 'val_mae_true_concepts')} | "
                     f"{fmt([m['test_mae_mean_predictor'] for m in runs])} | {concept} | "
                     f"{len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, help="default: the task's simulated cohort")
    ap.add_argument("--shape", type=int, default=96)
    ap.add_argument("--part", choices=("epoch", "mae", "oracle", "probe"), required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, help="epoch part: time the first n subjects only")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--search-trials", type=int, default=8)
    ap.add_argument("--variants", nargs="+", help="mae part: only these variants")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a task parameter for every run (mae, probe, oracle parts), as "
                         "`bench run --set`")
    ap.add_argument("--out", type=Path, default=Path("/tmp/brain-age-bench"),
                    help="mae part: each run's artifacts (predictions.csv)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    parts = {"epoch": part_epoch, "mae": part_mae, "oracle": part_oracle, "probe": part_probe}
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
