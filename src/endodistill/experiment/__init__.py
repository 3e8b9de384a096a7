"""Orchestration above single runs: studies (grids of settings on the same folds, with shared units)."""
