"""The metric protocols, in one registry: what each protocol's numbers mean (``DEFINITIONS``,
recorded in every results.json next to them) and the report's columns for it (``PROTOCOLS``),
plus ``IGNORE_INDEX``, the mask value never scored. Torch-free: the report, the figures and the
training-side metrics all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Mask value that is never scored or trained on (Pascal VOC convention).
IGNORE_INDEX = 255

# Plain-words definitions, recorded in every results.json next to the numbers.
DEFINITIONS = {
    "standard": (
        "test/{iou,dice,pixel_acc,boundary_f1}: pooled over the split's confusion matrix (boundary counts summed); "
        "IoU/Dice averaged over foreground classes 1..C-1 present in target or prediction (1 if none); "
        "pixel accuracy over all scored pixels; ignored (255) pixels never scored. "
        "test/*_image: the same per-image values averaged over images (the aggregation of the report's paired deltas)."
    ),
    "unet_crfrnn": (
        "per image over all C classes including background: IU = mean_c IoU_c, IoU_c = TP/(TP+FP+FN) and 0 when "
        "class c is empty in the prediction or the ground truth; DSC likewise with (2TP+1)/(|pred_c|+|gt_c|+1); "
        "PA = foreground recall sum_{c>0} TP_c / sum_{c>0} |gt_c| (0 without foreground pixels), not pixel accuracy; "
        "ignored (255) pixels excluded; each averaged over images (UNet-CRF-RNN utils.py, generalised to C classes)."
    ),
}


@dataclass(frozen=True)
class Column:
    """A table column: results.json metric key, title, per-image row key (paired columns)."""

    key: str
    title: str
    per_image: str | None = None
    scale: float = 100.0
    per_volume: str | None = None  # per-volume row key: paired subject by subject


# Pooled columns are shown as they are; paired columns are image means, each with a Δ beside it.
PROTOCOLS = {
    "standard": {
        "pooled": (
            Column("test/iou", "IoU % (pooled)"),
            Column("test/dice", "Dice % (pooled)"),
            Column("test/pixel_acc", "PA % (pooled)"),
            Column("test/boundary_f1", "BF1 % (pooled)"),
        ),
        "paired": (
            Column("test/iou_image", "IoU % (img mean)", "iou"),
            Column("test/boundary_f1_image", "BF1 % (img mean)", "boundary_f1"),
        ),
    },
    "unet_crfrnn": {
        "pooled": (),
        "paired": (
            Column("test/unet_crfrnn/iu", "IU %", "unet_crfrnn/iu"),
            Column("test/unet_crfrnn/dsc", "DSC %", "unet_crfrnn/dsc"),
            Column("test/unet_crfrnn/pa", "PA (fg recall) %", "unet_crfrnn/pa"),
        ),
    },
}
COST = Column("test/ms_per_image", "ms/img", scale=1.0)
BASE_PROTOCOLS = tuple(PROTOCOLS)
# Volumetric runs (results.json with per_volume rows: one per subject's restacked volume) are
# compared per volume first: the subject is the unit, distances in mm.
VOLUME_COLUMNS = (
    Column("test/volume/dice", "Dice % (vol mean)", per_volume="dice"),
    Column("test/volume/nsd", "NSD % (vol mean)", per_volume="nsd"),
    Column("test/volume/hd95", "HD95 mm (vol mean)", scale=1.0, per_volume="hd95"),
)
VOLUME = "/volume"
for _name in BASE_PROTOCOLS:
    PROTOCOLS[_name + VOLUME] = {"pooled": PROTOCOLS[_name]["pooled"],
                                 "paired": (*VOLUME_COLUMNS, *PROTOCOLS[_name]["paired"])}
PROTOCOL_NOTES = {
    "standard": "standard protocol: IoU/Dice over foreground classes; *pooled* = over the split's confusion "
                "matrix; *img mean* = per-image values averaged over images (the aggregation the Δ uses).",
    "unet_crfrnn": "unet_crfrnn protocol (the origin study's evaluation, C classes): per image IU and DSC over all "
                   "classes including background, or over background and one merged foreground in runs with "
                   "metrics.merge_foreground=true (0 for a class empty in prediction or truth; DSC +1 smoothed), "
                   "PA = foreground recall (not pixel accuracy), each averaged over images.",
}
VOLUME_NOTE = ("Volumes: each subject's slices restacked (padding removed) and scored as one volume: Dice, NSD "
               "(surface Dice at the recorded tolerance) and HD95 in mm (lower is better; infinite where a class is "
               "missed or hallucinated, and then no Δ is computed) per foreground class, averaged; every volume Δ "
               "pairs subject with subject, and slice metrics are clustered by subject: the subject is the unit.")
for _name in BASE_PROTOCOLS:
    PROTOCOL_NOTES[_name + VOLUME] = PROTOCOL_NOTES[_name] + " " + VOLUME_NOTE


