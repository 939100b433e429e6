"""Studies: a plan of jobs as data (``plan``), checked against the report's pairing rule
(``pairing``), run in one process (``runner``); the two studies' plans and tables
(``paper_table``, ``origin``) and the ``segrefine-study`` command (``cli``).

Only ``paper_table`` (``study_plan``) and ``origin`` name heads; the rest works on any plan.
"""

from segrefine.study.pairing import check_pairings, pairings
from segrefine.study.paper_table import (
    CRFRNN_PROTOCOLS,
    FINETUNE_EPOCHS,
    TUNE_TRIALS,
    preset_defaults,
    study_args,
    study_plan,
)
from segrefine.study.plan import (
    KINDS,
    Job,
    Plan,
    changed_backbone,
    compose_eval,
    compose_train,
    describe,
    is_volumetric,
    job_config,
    runtime_overrides,
)
from segrefine.study.runner import EVAL_KEYS, record_time, run_plan, run_study

__all__ = [
    "CRFRNN_PROTOCOLS", "EVAL_KEYS", "FINETUNE_EPOCHS", "KINDS", "TUNE_TRIALS", "Job", "Plan", "changed_backbone",
    "check_pairings", "compose_eval", "compose_train", "describe", "is_volumetric", "job_config",
    "pairings", "preset_defaults", "record_time", "run_plan", "run_study", "runtime_overrides", "study_args", "study_plan",
]
