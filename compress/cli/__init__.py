"""The ``dqrm-compress`` command line."""
