"""mlcloud: GPU clusters on demand, distributed torchrun jobs across them."""

__version__ = "0.1.0"
