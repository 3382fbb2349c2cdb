"""Entry for `python -m finetune` and for `accelerate launch finetune ...`.

`accelerate launch finetune ...` runs `python finetune ...`, which puts this folder itself first on `sys.path`:
`import finetune` would fail and a sibling named like a standard module could shadow it. Replace that entry
with the folder above before importing anything of ours.
"""

import os
import sys

if __package__ in (None, ""):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from finetune.cli import main  # noqa: E402

sys.exit(main())
