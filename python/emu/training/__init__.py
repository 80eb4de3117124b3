"""Training and rollout code: the only place that joins models, data and (through metrics) physics."""
