"""Local re-implementation of the competition scorer (see `evaluate.evaluate_folder`)."""
from .score import HIGHER_IS_BETTER, METRICS, total_from, total_score

__all__ = ["METRICS", "HIGHER_IS_BETTER", "total_score", "total_from"]
