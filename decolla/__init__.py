"""DeColla: decentralized collaborative deep-learning inference across small devices."""

__version__ = "0.1.0"
