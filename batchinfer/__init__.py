"""batchinfer: batch inference over Parquet partitions with PyTorch models, orchestrated by Prefect.

This package is the core: plain Python that never imports prefect. The flow lives
in `flows/`, thin task wrappers in `tasks/`.
"""

__version__ = "0.1.0"
