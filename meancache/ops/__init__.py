"""MeanCache's tensor operators: one module per op, each dispatching to the fastest implementation."""

from meancache.ops.average_velocity_step import average_velocity_step, average_velocity_step_reference
from meancache.ops.jvp_attention import attention, jvp_attention

__all__ = ["attention", "average_velocity_step", "average_velocity_step_reference", "jvp_attention"]
