"""The training stages: teacher pretraining, teacher rollouts, SFT, on-policy distillation, the AdaMoE baseline."""
