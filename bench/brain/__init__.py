"""Brain MRI support for the `brain-age` task: NIfTI cohorts, a simulated cohort, models.

`cohort` reads a folder of NIfTI images plus a metadata CSV into resident float16 tensors;
`sim` writes a simulated cohort in exactly that layout from the MNI152 template; `models`
holds the 3D CNN and the volumes-to-age regressors; `splits` the stratified splits and the
scaler; `evaluation` the metrics in years and mL and the per-subject artifacts; `plots` the
figures. nibabel and nilearn (the `brain` extra) are imported inside functions, so
importing this package costs nothing.
"""
