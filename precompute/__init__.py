"""Stage 1: encode videos and captions into WebDataset shards (`ft precompute`)."""
