"""Pure per-record / per-batch stage functions. Nothing here imports Ray."""
