"""Corruption-robustness harness, domain-free: a study runs a model over corruption x severity.

One job per module; domain code (pathology, segmentation) supplies its corruptions, model loader and
evaluator through `study.Study`, and this package never imports a domain package.

- `grid`: the cells of one model's grid (clean + corruption x severity), seeded, resumable, as tidy rows
- `metrics`: ImageNet-C CE, relative CE, mCE and relative mCE against a reference model
- `results`: the tidy results CSV (write, read back for resuming)
- `plots`: severity curves and heat-maps
- `report`: a study's output folder (results.csv, CE tables, plots, summary.json)
- `study`: the runner every domain shares (the models to run, their grids, resume, the report)
"""
