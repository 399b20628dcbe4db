"""The low layer: mechanics every estimator shares, importing nothing above it."""
