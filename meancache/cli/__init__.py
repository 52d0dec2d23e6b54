"""The ``meancache`` command line.

Importing the CLI drops one third-party warning it cannot fix: transformers' note that an image processor
class imported by diffusers' pipelines (``CLIPImageProcessor``, ``SiglipImageProcessor``) falls back to its
PIL implementation because torchvision is not installed. MeanCache uses no image processor; the library
itself leaves transformers' logging alone.
"""

import logging


class _NoTorchvisionFallbackNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNote())
