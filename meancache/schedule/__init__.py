"""Cache schedules: the data type, the published presets."""

from meancache.schedule.presets import PRESETS
from meancache.schedule.schedule import Schedule

__all__ = ["PRESETS", "Schedule"]
