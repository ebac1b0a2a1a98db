"""What both stages share: the CLI, the shard contract, video decoding, dataset readers."""

__version__ = "0.1.0"
