"""``reverie bench cl``: the class-incremental protocol on any NPZ dataset, reverie against
baselines in the same run (issue 5). Registered through the ``reverie.bench`` entry
point (`export.bench_cl.cli.register`); importing this package stays cheap (no torch).

Modules: `protocol` (split, stream, evaluation, the reverie method), `metrics` (ACC, BWT,
forgetting), `baselines` (latent and torch-head baselines, the joint upper bound),
`river_baselines` (river's online learners on raw inputs), `plot`, `cli`.
"""
