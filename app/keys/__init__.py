"""API keys, the realtime tokens they mint, and the watch that ends what a revoked key held."""
