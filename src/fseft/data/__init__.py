"""Data: images with geometry, readers/writers, manifests, transforms, synthetic CT, integrity checks."""
