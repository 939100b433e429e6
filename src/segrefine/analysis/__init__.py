"""The report, torch-free (no torch, Lightning, smp or Hydra import): ``sources`` (folders and
wandb -> run records and the runs left out), ``rows`` (configurations, baselines, pairing),
``stats`` (all inference), ``render`` (Markdown, CSV, LaTeX, DataFrame; ``write_report``),
``figures`` and ``cli`` (``segrefine-report``)."""
