"""Turn a finished Optuna sweep over a head's parameters into a head config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def tuned_head_config(base: Path, best_params: dict[str, Any], name: str) -> DictConfig:
    """The base head config with ``head.<key>`` best parameters filled in and a new name."""
    head = OmegaConf.load(base)
    for key, value in best_params.items():
        if not key.startswith("head."):
            continue
        field = key.removeprefix("head.")
        if field not in head:
            raise KeyError(f"tuned parameter {key!r} is not a field of {base}")
        head[field] = value
    head.name = name
    return head


class SaveTunedHead(Callback):
    """At the end of an Optuna multirun: print the best parameters and save them as
    ``conf/head/<name>.yaml`` (usable as ``head=<name>``), with a copy in the sweep dir."""

    def __init__(self, base_head: str = "densecrf", name: str = "densecrf_tuned", output: str | None = None):
        self.base_head, self.name, self.output = base_head, name, output

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from segrefine.train import CONFIG_DIR

        sweep_dir = Path(config.hydra.sweep.dir)
        results_file = sweep_dir / "optimization_results.yaml"
        if not results_file.exists():
            print(f"[tune] no {results_file}: was the Optuna sweeper used?")
            return
        results = OmegaConf.load(results_file)
        head = tuned_head_config(Path(CONFIG_DIR, "head", f"{self.base_head}.yaml"), dict(results.best_params), self.name)
        header = f"# Tuned on the validation split by {sweep_dir} (best value {results.best_value:.4f}).\n"
        text = header + OmegaConf.to_yaml(head)
        output = Path(self.output) if self.output else Path(CONFIG_DIR, "head", f"{self.name}.yaml")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        (sweep_dir / f"{self.name}.yaml").write_text(text)
        print(f"[tune] best value {results.best_value:.4f} with")
        for key, value in results.best_params.items():
            print(f"[tune]   {key}={value}")
        print(f"[tune] saved as {output} (use head={self.name})")
