"""Evaluation: label-word scoring, validation loss, zero-shot score cache, simulated INT8 scores."""
