"""``segrefine-study <study> [options] [overrides]``: run a study from the installed package.

    segrefine-study paper_table --preset smoke --seeds 0,1
    segrefine-study unet_crfrnn_table --plan-only
    segrefine-study paper_table --help       # the study's own options

Each study's options are its module's (``segrefine.study.paper_table``,
``segrefine.study.origin``); extra arguments are Hydra overrides for training.
"""

from __future__ import annotations

import shlex
import sys

STUDIES = {
    "paper_table": "segrefine.study.paper_table",
    "unet_crfrnn_table": "segrefine.study.origin",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[0] + "\n\nstudies: " + ", ".join(STUDIES))
        return 0 if argv else 2
    study, rest = argv[0], argv[1:]
    if study not in STUDIES:
        print(f"segrefine-study: unknown study {study!r}; choose one of {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(STUDIES[study])
    # study.json records the command that produced the study, as the user typed it
    return module.main(rest, prog=f"segrefine-study {study}", command=shlex.join(["segrefine-study", *argv]))


if __name__ == "__main__":
    sys.exit(main())
