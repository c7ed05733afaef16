"""What every training job shares: the accelerate loop, recipes, checkpoints, prompts, the teacher scorers."""
