"""Encoders: a registry of feature networks with their preprocessing, pooling and weight layouts.

`histo encoders` lists them. `open_extractor("uni", "pytorch_model.bin")` loads a released weight file
(every tensor checked) into the entry's network; `FeatureExtractor.extract(tiles)` turns uint8 RGB tiles
into features. Entries (one module per family, registered on first use): kimianet, densenet121-imagenet,
the CBR nets, resnet50-trunc (CLAM), and the timm-built pathology foundation encoders (UNI, UNI2-h,
Virchow, Virchow2, H-optimus-0, Phikon, Phikon-v2, Prov-GigaPath, CTransPath, CONCH), which need the
`encoders` extra (timm).
"""

from pathology.encoders.extractor import (
    PRECISIONS,
    FeatureExtractor,
    encoder_definition,
    encoder_preprocess,
    open_extractor,
    reopen_extractor,
    weights_hash,
)
from pathology.encoders.preprocess import TILE_RULES, Preprocess
from pathology.encoders.registry import Encoder, get_encoder, names, register
from pathology.encoders.weights import Layout, load_weights, read_weights

__all__ = [
    "PRECISIONS",
    "TILE_RULES",
    "Encoder",
    "FeatureExtractor",
    "Layout",
    "Preprocess",
    "encoder_definition",
    "encoder_preprocess",
    "get_encoder",
    "load_weights",
    "names",
    "open_extractor",
    "read_weights",
    "register",
    "reopen_extractor",
    "weights_hash",
]
