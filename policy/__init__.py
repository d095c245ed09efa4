"""Offline training of DeColla's allocation policy (installed as decolla.policy).

simulator: stage-execution simulator and measured-profile tools; scenarios: random
episodes; net: the torch policy and its numpy export; rollout: batched episodes;
train: DRL, ES and DRL-ES training (``python -m decolla.policy.train``).
"""
