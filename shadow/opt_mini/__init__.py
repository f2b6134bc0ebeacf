"""opt-mini: the small OPT model and offline evaluation data shipped inside the package.

Rebuild everything here from public-domain sources with `python -m shadow.opt_mini.build` (see its docstring).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
DATA_DIR = ROOT / "data"
TASKS_DIR = ROOT / "tasks"
CALIBRATION_FILE = DATA_DIR / "calibration.jsonl"
PERPLEXITY_FILE = DATA_DIR / "perplexity.jsonl"
TASK_NAMES = ("opt_mini_nextsent", "opt_mini_lastword")
PERPLEXITY_TASK = "opt_mini_ppl"
