"""The ShapesWorld demo: train, merge, evaluate, sweep, rerank, PPO, report."""
