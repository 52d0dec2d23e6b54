"""The MeanCache method: velocity estimators for skipped steps and the framework-free sampler."""
