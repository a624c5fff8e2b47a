"""Fit a model into a size budget: the per-table options, their measured sensitivity, the exact
choice under the budget, and the recipe it becomes (``dqrm-compress --budget``)."""
