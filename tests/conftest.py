import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("MPLBACKEND", "Agg")
# bnkit's rich consoles read their width once, when bnkit.cli is imported; without a terminal rich takes 80
# columns and wraps long temporary paths mid-sentence, so text a test looks for could straddle two lines
os.environ.setdefault("COLUMNS", "240")
