"""`python -m src.triage STUDY...`: the triage CLI (src/triage/cli.py)."""

from src.errors import run_cli
from src.triage.cli import main

run_cli(main)
