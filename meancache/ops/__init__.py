"""MeanCache's tensor operators: one module per op, each dispatching to the fastest implementation."""

from meancache.ops.average_velocity_step import average_velocity_step, average_velocity_step_reference

__all__ = ["average_velocity_step", "average_velocity_step_reference"]
