"""Engine glue between the bundle's configs and MONAI's / ignite's engines: handlers, distributed runs, input
checks, batches of whole frames, the autocast inferer and the process settings."""
