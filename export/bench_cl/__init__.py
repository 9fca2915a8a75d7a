"""``reverie bench cl``: the class-incremental protocol on NPZ datasets, reverie against
baselines in the same run (issues 5 and 12). Registered through the ``reverie.bench``
entry point (`export.bench_cl.cli.register`); importing this package stays cheap (no
torch, river or sktime).

Modules: `protocol` (split, stream, evaluation, novelty, the reverie method), `metrics`
(ACC, BWT, forgetting, AUROC), `baselines` (latent and torch-head baselines, the joint
upper bound), `minirocket` (MiniRocket + streaming LDA, MiniRocket + ridge),
`river_baselines` (river's online learners on raw inputs), `report` (the markdown
tables), `plot`, `cli`.
"""
