"""What MONAI Label needs from this bundle beyond inference.yaml: training on datastore frames (training.py)
and the bundle folder a MONAI Label app serves (bundle_folder.py). Named so as not to shadow the
``monailabel`` package."""
