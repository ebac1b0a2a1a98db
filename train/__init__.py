"""Stage 2: stream shards into a transformer-only trainer (`ft train`), and generate with the result."""
