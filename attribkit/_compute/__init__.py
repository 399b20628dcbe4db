"""The low layer shared by every estimator: mechanics that import nothing above them."""
