"""ICH detection pipeline for the RSNA 2019 head-CT data: one module per stage (`python -m src.<stage>`)."""
