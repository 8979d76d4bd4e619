"""histo: slide retrieval and brain-tumour segmentation sharing one normalization library."""

__version__ = "0.1.0"
