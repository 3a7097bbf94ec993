"""modelpress: make trained models smaller and faster, and measure what it costs."""

__version__ = "0.1.0"
