"""One module per CLI subcommand; shared argument helpers in common.py."""
