"""Network parts: SAM backbone builders, the SurgicalSAM prompt encoder and model."""
