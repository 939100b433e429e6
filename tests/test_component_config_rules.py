"""Each backbone and head owns the rules of its config keys: the builder asks the class, so a
new head (here one defined in this file) is checked without touching any central table."""

from __future__ import annotations

import ast

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from segrefine.build import build_component
from segrefine.heads.base import Head
from segrefine.types import BackboneSpec
from segrefine.validation import ConfigValueError, check_config

SPEC = BackboneSpec((8,), (1,), 1, 1)


class DepthHead(Head):
    """A head that only exists here: its rule lives on the class, nowhere else."""

    CONFIG_RULES = {"depth": (int, 2, ())}

    def __init__(self, num_classes: int, depth: int, backbone=None):
        super().__init__(num_classes, backbone)
        self.depth = depth


def head_node(**keys):
    return OmegaConf.create({"head": {"_target_": f"{__name__}.DepthHead", "name": "depth", **keys}}).head


def test_a_new_heads_own_rule_is_honoured_by_name():
    with pytest.raises(ConfigValueError, match=r"^head\.depth=1 must be an integer >= 2$"):
        build_component(head_node(depth=1), num_classes=2, backbone=SPEC)
    with pytest.raises(ConfigValueError, match=r"head\.depth=2\.5 must be an integer"):
        build_component(head_node(depth=2.5), num_classes=2, backbone=SPEC)
    assert build_component(head_node(depth=3), num_classes=2, backbone=SPEC).depth == 3


@pytest.mark.parametrize("head, key", [("crfrnn", "iterations"), ("crfrnn", "eval_iterations"), ("densecrf", "iterations")])
def test_crf_heads_refuse_zero_iterations_naming_the_key(make_cfg, head, key):
    cfg = make_cfg(f"head={head}", f"head.{key}=0")
    check_config(OmegaConf.to_container(cfg, resolve=True))  # no longer a central rule ...
    with pytest.raises(ConfigValueError, match=rf"head\.{key}=0 must be an integer >= 1"):
        build_component(cfg.head, num_classes=2, backbone=SPEC)  # ... but the head's own


def _code_strings(path) -> set[str]:
    """String literals of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_central_config_code_names_no_head_or_backbone():
    names = {p.stem for group in ("head", "backbone") for p in (REPO / "conf" / group).glob("*.yaml")} - {"none"}
    assert {"crfrnn", "densecrf", "pointrend", "unet", "fcn"} <= names
    # The study machinery too: only the plans (study/paper_table.py, study/origin.py) name heads.
    for module in ("validation.py", "runconfig.py", "build.py", "train.py", "evaluate.py",
                   "study/plan.py", "study/pairing.py", "study/runner.py", "study/cli.py"):
        strings = _code_strings(REPO / "src" / "segrefine" / module)
        named = {s for s in strings for name in names if name in s.replace(".", " ").replace("=", " ").split()}
        assert not named, f"{module} names a component in {named}"
