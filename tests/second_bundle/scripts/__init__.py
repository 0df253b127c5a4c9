"""Python of the second, unrelated bundle of the two-bundle MONAI Label test (tests/test_monailabel_server.py).

Its configs say ``scripts.<module>`` like every MONAI bundle, so in one MONAI Label server this package and the
surgical bundle's ``scripts`` share one top-level name.
"""
