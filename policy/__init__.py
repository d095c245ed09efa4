"""Offline training of the allocation policy (installed as decolla.policy)."""
