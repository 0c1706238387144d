"""The brain-age task's declaration: parameters, metrics, budget, rules (torch-free).

The implementation is bench.tasks.brain_age (BrainAgeTrial), its networks bench.brain.models,
its figures bench.brain.plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.params import Bool, Choice, Float, Int, Metric, Text, only_with
from bench.registry import declare_task

CONCEPTS = ("csfv", "gmv", "wmv")  # per-concept metrics are declared for these names
BUCKETS = tuple(range(0, 100, 10))  # MAE by 10-year age bucket
HEADS = ("flatten", "mean")
NORMS = ("none", "batch")  # instance/group norm would remove each subject's own mean: the count


def conv_channels(params: Mapping[str, Any]) -> list[int]:
    """The conv channels per layer: `channels` ("2,16,64") or `depth` layers of width*2**i."""
    text = str(params.get("channels") or "").strip()
    if text:
        return [int(c) for c in text.split(",") if c.strip()]
    return [int(params["width"]) * 2**i for i in range(int(params["depth"]))]


def feature_size(shape: int, layers: int, kernel: int, padding: str) -> int:
    """Edge of the last feature map: each block loses kernel-1 voxels (valid), then halves."""
    size = shape
    for _ in range(layers):
        size = (size - (kernel - 1 if padding == "valid" else 0)) // 2
    return size


PARAMS = {
    "cohort": Text(None, help="cohort folder; null: the simulated cohort (generated once)"),
    "metadata": Text("metadata.csv"),
    "file_pattern": Text("{id}.nii.gz"),
    "id_column": Text("id"),
    "age_column": Text("age"),
    "concepts": Text("csfv,gmv,wmv", help="metadata columns the CNN predicts"),
    "split_column": Text("split", help='rows whose value is "test" form the test split'),
    "shape": Int(96, 8, 512, help="edge of the cube the volumes are brought to"),
    "resize": Choice("resample", ["resample", "crop"]),
    "normalize": Choice("percentile", ["percentile", "zscore", "none"]),
    "mask_channel": Bool(False, since="2026-12-01",
                         help="a second input channel: the fraction of each voxel inside the "
                              "brain (the skull-stripped image's voxels above its background "
                              "at the native resolution, resized like the image)"),
    "moments": Int(1, 1, 3, since="2026-12-02",
                   help="input channels of the normalised intensity's powers 1..moments, "
                        "each averaged over the voxel at the native resolution (1: the "
                        "image alone; 2 adds the mean of its square: a 6 mm voxel's mean and "
                        "mean square tell its CSF/GM/WM mix apart where the mean cannot; "
                        "only when the image is shrunk: read at its native resolution the "
                        "channels are the image's powers, nothing more)"),
    "net": Choice("cnn", ["cnn", "shell_ridge"], since="2026-12-02",
                  help="the volumes' model: the 3D CNN, or shell_ridge: a ridge regression "
                       "fitted in closed form on per-voxel monomials (degree <= 3) of the "
                       "input channels summed in `shells` depth shells of the brain (needs "
                       "mask_channel=true, model=bottleneck, mode=independent; the CNN's "
                       "parameters and epochs do not apply; searched by the "
                       "shell-ridge-search variant)"),
    "shells": Int(3, 1, 6, since="2026-12-02",
                  help="net=shell_ridge: depth shells of the brain, layers shape/32 voxels "
                       "thick (6 mm in a 200 mm field of view) from its surface, the last "
                       "one the rest"),
    "bins": Int(0, 0, 64, since="2026-12-02",
                help="net=shell_ridge: 0, or k >= 2 bins of a soft histogram of the "
                     "intensity per shell, added to the monomials (bin centres spread over "
                     "the training brains' 0.5-99.5th intensity percentiles; a volume can "
                     "then follow any piecewise-linear function of the intensity)"),
    "on_bad_file": Choice("error", ["error", "skip"]),
    # 622 subjects: 466 in train+val after the 25% test split, the report's training set
    "sim_n": Int(622, 10, 100_000, help="simulated cohort: subjects"),
    "sim_seed": Int(0, 0),
    "sim_shape": Int(None, 8, 512, help="edge the simulated cohort is generated at (the "
                     "loader then brings it to `shape`); null: `shape`"),
    "model": Choice("bottleneck", ["bottleneck", "direct"], help="direct: CNN -> age"),
    "mode": Choice("independent", ["independent", "sequential", "joint"]),
    "regressor": Choice("mlp", ["mlp", "kernel_ridge", "ridge"]),
    "depth": Int(1, 1, 8, help="conv blocks (conv - [norm] - ReLU - 2x pool)"),
    "width": Int(2, 1, 512, help="channels of the first block, doubled at each next one"),
    "channels": Text("", help="conv channels per block, e.g. '2,16,64' (the report's H1); "
                     "empty: depth blocks of width * 2**i. Given, depth and width must agree"),
    "kernel": Int(3, 1, 11),
    "padding": Choice("valid", ["valid", "same"], help="valid: none, as the report's"),
    "pooling": Choice("max", ["max", "avg"]),
    "norm": Choice("none", list(NORMS), help="after each conv"),
    "head": Choice("flatten", list(HEADS),
                   help="flatten: every voxel into a linear layer (the report's); mean: a "
                        "per-voxel classifier averaged over space (a volume is a count)"),
    "hidden": Int(0, 0, 4096, help="hidden units before the head's output (the report's H1: "
                                   "16); for head=mean a 1x1x1 conv, per voxel"),
    "dropout": Float(0.0, 0.0, 0.99),
    "augment": Choice("none", ["none", "flip"],
                      help="flip: each training volume mirrored left-right with p=0.5 (a "
                           "mirrored brain has the same tissue volumes)"),
    "concept_scaling": Choice("minmax", ["minmax", "zscore"],
                              help="targets of the CNN and inputs of the regressor"),
    "lr": Float(1e-3, high=10.0, above=0.0),
    "lr_schedule": Choice("constant", ["constant", "cosine"],
                          help="cosine: to 0 over `epochs`, stepped per epoch"),
    "weight_decay": Float(0.0, 0.0),
    "batch_size": Int(16, 1, help="the report does not give it"),
    "epochs": Int(30, 1, 100_000),
    "concept_weight": Float(1.0, 0.0, help="joint: weight of the concept MSE"),
    "mlp_hidden": Int(64, 1),
    "mlp_layers": Int(1, 0, 16),
    "mlp_epochs": Int(30, 1, 100_000),
    "mlp_batch_size": Int(16, 1, nullable=True, help="null: full batch; the report does not "
                                                      "give it"),
    "mlp_lr": Float(1e-3, high=10.0, above=0.0),
    "mlp_weight_decay": Float(0.0, 0.0),
    "kr_alpha": Float(0.01, above=0.0, help="the report's H2: 0.01; its H3 search: 0.001"),
    "kr_gamma": Float(0.1, above=0.0, help="the report's H2: 0.1; its H3 search: 0.02"),
    "ridge_alpha": Float(1.0, 0.0),
    "train_size": Int(None, 1),
    "test_size": Int(None, 1, help="cap on test subjects (evaluation only)", execution=True),
    "test_fraction": Float(0.25, high=0.9, above=0.0),
    "val_fraction": Float(0.15, high=0.9, above=0.0),
    "split_seed": Int(0, 0),
    "eval_batch_size": Int(32, 1, execution=True),
}
# where a parameter has an effect (a run searching one where it has none is told so)
CNN_PARAMS = ("depth", "width", "channels", "kernel", "padding", "pooling", "norm", "head",
              "hidden", "dropout", "augment", "lr", "lr_schedule", "weight_decay",
              "batch_size", "epochs")
REGRESSED = {"model": ["bottleneck"], "mode": ["independent", "sequential"]}
PARAMS = only_with(PARAMS, CNN_PARAMS, net=["cnn"])
PARAMS = only_with(PARAMS, ["shells", "bins"], net=["shell_ridge"])
PARAMS = only_with(PARAMS, ["mode"], model=["bottleneck"])
PARAMS = only_with(PARAMS, ["concept_weight"], model=["bottleneck"], mode=["joint"])
PARAMS = only_with(PARAMS, ["regressor"], **REGRESSED)
PARAMS = only_with(PARAMS, ["kr_alpha", "kr_gamma"], regressor=["kernel_ridge"], **REGRESSED)
PARAMS = only_with(PARAMS, ["mlp_hidden", "mlp_layers", "mlp_epochs", "mlp_batch_size",
                            "mlp_lr", "mlp_weight_decay"], regressor=["mlp"], **REGRESSED)
PARAMS = only_with(PARAMS, ["ridge_alpha"], regressor=["ridge"], **REGRESSED)
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
SMOKE = {"shape": 24, "sim_n": 40, "sim_shape": None, "epochs": 2, "batch_size": 8,
         "mlp_epochs": 5}  # sim_shape None: generated at 24^3, not at the YAML's 96^3
YEARS, ML, SCALED = "years", "mL", "MSE (scaled)"
METRICS = {
    "train_loss": Metric(SCALED, "training loss on scaled targets, mean over the epoch",
                         "train"),
    "val_loss": Metric(SCALED, "the training loss on the validation split, after the epoch",
                       "val"),
    "val_mae": Metric(YEARS, "mean absolute error of the predicted age, validation", "val"),
    "val_mae_mean_predictor": Metric(YEARS, "MAE of predicting the training mean age, "
                                     "validation", "val"),
    "val_mae_true_concepts": Metric(YEARS, "MAE of the regressor fed the TRUE volumes, "
                                    "validation (mode=independent: the bottleneck's "
                                    "ceiling)", "val"),
    "test_mae": Metric(YEARS, "mean absolute error of the predicted age, test", "test"),
    "test_bias": Metric(YEARS, "mean signed error (predicted - true), test", "test"),
    "test_r2": Metric("", "coefficient of determination of the age, test", "test"),
    "test_mae_mean_predictor": Metric(YEARS, "MAE of predicting the training mean age, test",
                                      "test"),
    "test_mae_true_concepts": Metric(YEARS, "MAE of the regressor fed the TRUE volumes, test "
                                     "(mode=independent: the bottleneck's ceiling)", "test"),
    **{f"test_mae_{b}_{b + 9}": Metric(YEARS, f"test MAE of subjects aged {b}-{b + 9}", "test")
       for b in BUCKETS},
    **{f"concept_mae_{c}": Metric(ML, f"MAE of the predicted {c}, test", "test")
       for c in CONCEPTS},
    **{f"concept_r_{c}": Metric("", f"Pearson r of the predicted and true {c}, test", "test")
       for c in CONCEPTS},
    **{f"val_concept_r_{c}": Metric("", f"Pearson r of the predicted and true {c}, "
                                    "validation", "val") for c in CONCEPTS},
}


def rules(params: Mapping[str, Any]) -> list[str]:
    """Combinations of values that cannot run."""
    return [*_architecture_rules(params), *_mode_rules(params)]


def _architecture_rules(params: Mapping[str, Any]) -> list[str]:
    text = str(params["channels"]).strip()
    try:
        chans = conv_channels(params)
    except ValueError:
        chans = []
    if text and not chans:
        return [f"channels: must be comma-separated positive integers, got {text!r}"]
    bad = []
    if text and (len(chans) != int(params["depth"]) or chans[0] != int(params["width"])):
        bad.append(f"channels: {text!r} has {len(chans)} block(s) starting at {chans[0]} "
                   f"channels: depth must be {len(chans)} and width {chans[0]}, got depth "
                   f"{params['depth']}, width {params['width']}")
    if any(c < 1 for c in chans):
        bad.append(f"channels: every block needs >= 1 channel, got {text!r}")
    size = feature_size(int(params["shape"]), len(chans), int(params["kernel"]),
                        params["padding"])
    if size < 1:
        bad.append(f"depth: {len(chans)} blocks of kernel {params['kernel']} "
                   f"({params['padding']} padding) shrink shape {params['shape']} below 1 voxel")
    return bad


def _mode_rules(params: Mapping[str, Any]) -> list[str]:
    bad = []
    if params["model"] == "bottleneck" and params["mode"] == "joint" \
            and params["regressor"] == "kernel_ridge":
        bad.append("regressor: mode=joint trains the regressor by gradient descent: regressor "
                   "must be mlp or ridge, got 'kernel_ridge'")
    if params["net"] == "shell_ridge":
        need = {"mask_channel": True, "model": "bottleneck", "mode": "independent"}
        for key, want in need.items():
            if params[key] != want:
                bad.append(f"net: shell_ridge (volumes fitted in closed form, shells cut "
                           f"from the brain mask) needs {key}={want!r}, got "
                           f"{params[key]!r}")
    bins = int(params["bins"])
    if bins == 1 or (bins and params["net"] != "shell_ridge"):
        bad.append(f"bins: a histogram of k >= 2 bins is a feature of net=shell_ridge: bins "
                   f"must be 0, or 2-64 with net=shell_ridge, got bins={bins} with "
                   f"net={params['net']!r}")
    if int(params["moments"]) > 1 and params["normalize"] == "none":
        bad.append(f"moments: powers of an intensity need a normalised image (normalize: "
                   f"percentile or zscore), got moments={params['moments']} with "
                   f"normalize='none'")
    if not concept_names(params):
        bad.append(f"concepts: must name at least one metadata column, got "
                   f"{params['concepts']!r}")
    return bad


def shell_voxels(shape: int) -> int:
    """Thickness of a `net=shell_ridge` shell in voxels, shape/32 rounded half up (6 mm
    in a 200 mm field of view at 32, 64, 96; within a voxel of it elsewhere)."""
    return max(1, (shape + 16) // 32)


def trained_epochs(params: Mapping[str, Any]) -> int:
    """`net=shell_ridge` is fitted when its trial is built: one epoch reports it."""
    return 1 if params["net"] == "shell_ridge" else int(params["epochs"])


def concept_names(params: Mapping[str, Any]) -> list[str]:
    """The `concepts` parameter ("csfv,gmv,wmv") as column names."""
    return [c.strip() for c in str(params["concepts"]).split(",") if c.strip()]


def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: every image of the cohort read in full (and cached), so a broken cohort
    exits 2 listing every bad file instead of failing each trial; and the splits made, so
    one that would be empty (a small cohort, `train_size=0`) does too."""
    from bench.brain.splits import make_splits
    from bench.tasks.brain_age import load_data  # torch: only when a run is checked

    make_splits(load_data(params, data_dir).meta, params)


# every parameter data_check reads (the cohort, how it is read, how it is split)
DATA_KEYS = ("cohort", "shape", "sim_n", "sim_seed", "sim_shape", "metadata", "file_pattern",
             "id_column", "age_column", "concepts", "resize", "normalize", "mask_channel",
             "moments", "split_seed", "split_column", "val_fraction", "test_fraction",
             "train_size", "test_size", "on_bad_file")

TASK = declare_task(
    "brain-age", "bench.tasks.brain_age:BrainAgeTrial", metric="val_mae", direction="minimize",
    params=PARAMS, metrics=METRICS, smoke=SMOKE, rules=rules, data=data_check,
    requires=("brain", ("nibabel", "nilearn")), epochs_of=trained_epochs, data_keys=DATA_KEYS,
    doc="Brain age from T1 MRI via a CNN -> tissue-volume bottleneck -> regressor (years MAE).")
