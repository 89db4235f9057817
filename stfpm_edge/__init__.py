"""stfpm-edge: Student-Teacher Feature Pyramid Matching, from training to edge engines."""

__version__ = "0.1.0"
