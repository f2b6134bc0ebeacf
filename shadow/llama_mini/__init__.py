"""llama-mini: the small Llama model shipped inside the package, with opt-mini's vocabulary.

Rebuild it with `python -m shadow.opt_mini.build --model llama-mini` (see that module's docstring). It has no
evaluation data of its own: it shares opt-mini's corpus splits, held-out data and lm-eval tasks (shadow.opt_mini).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
