"""The paper's evaluation (Tables 1-5) over converted weights and image folders.

`experiments.evaluate` computes per-image metrics, `experiments.tables` turns them into Markdown,
CSV and JSON tables beside PNG sample grids, and `python -m experiments.run TABLE ...` is the
command line (see experiments/README.md).
"""
