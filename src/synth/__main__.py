"""`python -m src.synth OUT`: write the embedded synthetic dataset (Kaggle layout, with masks)."""

from src.errors import run_cli
from src.synth.generator import main

run_cli(main)
