"""`python -m src.synth OUT`: write the embedded synthetic dataset (Kaggle layout, with masks)."""

from src.errors import run_cli
from src.synth.generator import main

if __name__ == "__main__":  # the writer processes (spawned) import this module again
    run_cli(main)
