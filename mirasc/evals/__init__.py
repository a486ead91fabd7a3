"""Recall and language-modeling evals, and the comparison report."""
