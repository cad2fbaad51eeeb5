"""gpt2: a Hydra-configured framework for training and sampling GPT-2 models with PyTorch."""

__version__ = "0.1.0"
