"""Files other pathology tools read and write: CLAM/TRIDENT coordinate and feature .h5, QuPath GeoJSON."""
