"""Synthetic worlds small enough to train every model of the pipeline on a CPU."""
