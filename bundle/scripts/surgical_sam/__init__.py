"""SurgicalSAM (Yue et al., AAAI 2024): the class-promptable model, its prototype prompt encoder, loss, inferer,
training batches and cached datasets, the original release's checkpoints, and its export parts."""
