"""Local re-implementation of the competition scorer.

`evaluate_folder(generated, references, weights)` scores a submission folder per style and
overall; `Scorer` keeps the networks loaded between calls; `report` prints, charts and compares.
"""
from .evaluate import ALL_METRICS, Scorer, evaluate_folder, locate_weights
from .score import HIGHER_IS_BETTER, METRICS, total_from, total_score

__all__ = ["METRICS", "ALL_METRICS", "HIGHER_IS_BETTER", "total_score", "total_from", "evaluate_folder", "Scorer",
           "locate_weights"]
