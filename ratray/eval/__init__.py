"""Evaluation: bits-per-byte, masked-token accuracy, recall@k, and the reports of finished runs.
Knows nothing of Ray Train: callers hand it sums (and all-reduce them first when distributed)."""
