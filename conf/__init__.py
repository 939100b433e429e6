# Makes conf/ the package segrefine.conf (pyproject.toml maps it), so its YAML files ship as
# package data; Hydra reads only the .yaml files.
