"""ZEDA trainer: local data, teacher pretraining, self-distillation, measurement and retraining.

Folders by job, each importing only the ones below it:

* ``data/``: the synthetic skills suite, stdlib text, the tokenizer, packing (imports nothing above);
* ``common/``: the accelerate loop, recipes, checkpoints, prompt sets, generation, teacher scorers;
* ``stages/``: pretraining, teacher rollouts and SFT on them (stage 1), OPD (stage 2), AdaMoE;
* ``measure/``: evaluation, the per-prompt analysis, the baseline comparison (trains its baselines);
* ``retrain/``: the sidecar that snapshots traffic, runs OPD, gates and promotes.
"""
