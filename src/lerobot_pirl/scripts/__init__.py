"""Console entry points: lerobot-pirl-train, lerobot-pirl-eval, lerobot-pirl-learner, lerobot-pirl-actor."""
