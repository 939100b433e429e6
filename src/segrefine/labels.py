"""A run's label: what its row is, in words ("U-Net + CRF-RNN", "FCN-8s + stride-4 skip").

``label=...`` sets it (studies do, from their plan); otherwise it is generated from the
backbone and head and from the overrides that changed the composed defaults. It names the
run in trackers (wandb's run name is the label and the seed) and is recorded in
results.json. It is a run-only key: it never changes which runs form a row of the report.

No torch here: the command line composes and checks labels before loading it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

MAX_LENGTH = 60
BACKBONE_WORDS = {"fcn": "FCN", "unet": "U-Net", "pspnet": "PSPNet", "segnet": "SegNet"}
HEAD_WORDS = {"none": "", "densecrf": "DenseCRF", "crfrnn": "CRF-RNN", "pointrend": "PointRend"}
# Keys a label says in words already (or that never describe a configuration): not
# repeated from the overrides.
SAID_OTHERWISE = ("seed", "label", "name", "init_from", "ckpt_path", "split", "backbone.name", "backbone.variant",
                  "backbone.fine_skip", "backbone.output_stride", "head.name")


class LabelError(ValueError):
    pass


def check_label(label: Any) -> str | None:
    """``label`` if it is usable (None or a string of at most ``MAX_LENGTH`` characters)."""
    if label is None:
        return None
    if not isinstance(label, str) or not label.strip():
        raise LabelError(f"label={label!r} must be a non-empty string (or null: generated from the config)")
    if len(label) > MAX_LENGTH:
        raise LabelError(f"label is {len(label)} characters long ({label!r}); at most {MAX_LENGTH} fit a table "
                         "row and a wandb run name: shorten it")
    return label


# Variants that are a backbone's default build: not worth a word in a label.
DEFAULT_VARIANTS = (None, "lite", "smp")


def backbone_words(backbone: Mapping[str, Any], head: str | None = None) -> str:
    """"FCN-8s", "PSPNet (Zhao)", "U-Net stopped at stride 4", "FCN-8s + stride-4 skip"."""
    name = str(backbone.get("name"))
    words = BACKBONE_WORDS.get(name, name)
    variant = backbone.get("variant")
    if name == "fcn" and variant:
        words += f"-{variant}"
    elif name == "unet" and variant == "vanilla":  # the origin study's network, by its own name
        words = f"Vanilla {words}" + (f" (width {backbone['base_width']})" if backbone.get("base_width") not in
                                      (None, 32) else "")
    elif variant not in DEFAULT_VARIANTS:
        words += f" ({str(variant).capitalize()})"
    stride = backbone.get("output_stride")
    if isinstance(stride, int) and stride > 1 and head != "pointrend":  # PointRend asks for its coarse map itself
        words += f" stopped at stride {stride}"
    if backbone.get("fine_skip"):
        words += " + stride-4 skip"
    return words


def head_words(head: Mapping[str, Any]) -> str:
    """"CRF-RNN", "DenseCRF (tuned)"; "" for ``none``."""
    name = str(head.get("name"))
    words = HEAD_WORDS.get(name, name)
    return f"{words} (tuned)" if words and head.get("tuned") else words


def _value_words(key: str, value: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    if key == "trainer.max_epochs":
        return f"{value} epoch" if value == "1" else f"{value} epochs"
    if "/" in value or len(value) > 24:  # paths and long values say nothing at a glance
        return f"other {last}"
    if value.lower() == "true":
        return last.replace("_", " ")
    if value.lower() in ("false", "null", "none"):
        return f"no {last.replace('_', ' ')}"
    return f"{last.replace('_', ' ')} {value.strip(chr(34) + chr(39))}"


def override_words(overrides: Iterable[str], config: Mapping[str, Any] | None = None) -> list[str]:
    """What ``key=value`` overrides change, in words ("12 epochs", "lr 0.0001", "no fine skip"):
    group selections, run-only keys (also those ``config``'s components declare) and keys said
    elsewhere in the label are left out."""
    from segrefine.runconfig import is_run_only

    words = []
    for override in overrides:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+~")
        if not sep or "." not in key or is_run_only(key, config) or key in SAID_OTHERWISE:
            continue  # a group selection (backbone=fcn) is said by the names
        if (said := _value_words(key, value)) is not None:
            words.append(said)
    return words


def shorten(text: str) -> str:
    return text if len(text) <= MAX_LENGTH else text[:MAX_LENGTH - 1].rstrip(" ,+") + "…"


def generated_label(config: Mapping[str, Any], overrides: Iterable[str] = ()) -> str:
    """The label of a resolved run config in words: backbone, head, then what ``overrides``
    changed from the composed defaults, early stopping, and whether it started from
    another run's weights. At most ``MAX_LENGTH`` characters."""
    head = config.get("head") or {}
    words = backbone_words(config.get("backbone") or {}, head.get("name"))
    if head_words(head):
        words += f" + {head_words(head)}"
    # The schedule first: what a reader of a results table asks about before other settings.
    extras = sorted(override_words(overrides, config), key=lambda w: not w.endswith((" epoch", " epochs")))
    callbacks = config.get("callbacks") or {}
    if any(isinstance(c, Mapping) and str(c.get("_target_", "")).endswith("EarlyStopping") for c in callbacks.values()):
        extras.insert(0, "early stopping")  # changes when training stops, so it makes its own row
    suffix = " (fine-tuned)" if config.get("init_from") else ""
    return shorten(with_extras(words, extras, suffix))


def with_extras(words: str, extras: list[str], suffix: str = "") -> str:
    """``words, extra, extra (suffix)`` with as many extras as fit ``MAX_LENGTH`` and
    ``+N more`` for the rest (whole words, never cut in the middle)."""
    for shown in range(len(extras), -1, -1):
        more = len(extras) - shown
        text = ", ".join([words, *extras[:shown], *([f"+{more} more"] if more else [])]) + suffix
        if len(text) <= MAX_LENGTH:
            return text
    return words + suffix


def task_overrides() -> list[str]:
    """The command line's overrides of this Hydra job that change a value of the composed
    defaults ([] outside a Hydra app): ``key=value`` overrides whose value equals what the
    job's group choices compose to without them are left out (they change nothing)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = list(HydraConfig.get().overrides.task)
    values = [o for o in overrides if "." in o.partition("=")[0] and not o.startswith("~")]
    if not values:
        return overrides
    try:
        from hydra import compose
        from omegaconf import OmegaConf

        # The same config with the group choices only (backbone=fcn, preset=smoke, ...).
        defaults = compose(HydraConfig.get().job.config_name, overrides=[o for o in overrides if o not in values])
        current = compose(HydraConfig.get().job.config_name, overrides=overrides)
    except Exception:  # composing again failed (it should not): keep every override's words
        return overrides

    def value(cfg, key: str):
        return OmegaConf.select(cfg, key.lstrip("+"), default=None, throw_on_resolution_failure=False)

    return [o for o in overrides if o not in values
            or value(defaults, o.partition("=")[0]) != value(current, o.partition("=")[0])]


def run_label(config: Mapping[str, Any], overrides: Iterable[str] | None = None) -> str:
    """The config's ``label``, else one generated from it and this job's overrides."""
    label = check_label(config.get("label"))
    return label or generated_label(config, task_overrides() if overrides is None else overrides)


def evaluation_label(config: Mapping[str, Any], trained: Mapping[str, Any], trained_label: str | None,
                     split: str = "test", overrides: Iterable[str] | None = None) -> str:
    """An evaluation's label: its ``label``, else the training run's label with the
    evaluated head ("FCN-8s + DenseCRF"), and the split when it is not ``test``."""
    label = check_label(config.get("label"))
    if label:
        return label
    head, trained_head = (config.get("head") or {}), (trained.get("head") or {}).get("name")
    trained_label = trained_label or generated_label(trained)
    if head.get("name") == trained_head:
        label = trained_label
    elif trained_head == "none":
        label = f"{trained_label} + {head_words(head)}"
    else:
        label = f"{generated_label({**trained, 'head': head, 'init_from': None})} on {HEAD_WORDS.get(trained_head, trained_head)} weights"
    extras = override_words(o for o in (task_overrides() if overrides is None else overrides)
                            if not o.lstrip("+~").startswith("head."))
    if split != "test":
        extras.insert(0, f"{split} split")
    return shorten(with_extras(label, extras))
