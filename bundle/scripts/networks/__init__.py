"""Network parts: SAM backbone builders, the SurgicalSAM prompt encoder and model, Distillation-SAM's
PVT, adapter, teacher prompts and model."""
