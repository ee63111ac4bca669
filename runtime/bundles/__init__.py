"""Deployment bundles on the device: the bundle itself, its manifest, its archive."""
