"""Measurements of the bundle: what ships never imports this package."""
