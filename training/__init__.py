"""The training engine behind main.py: one module per concern (see README)."""
