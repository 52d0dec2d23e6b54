"""The ``meancache`` command line."""
