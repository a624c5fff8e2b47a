"""dqrm-compress core: checkpoints, recipes, quantizers, QAT, parameter sharing, training, CLI.

The data path reads in one direction: checkpoint (:mod:`compress.io.checkpoint`) -> model
(:mod:`compress.io.model`) -> recipe plan -> compressed model -> artifacts (``exporters``) -> runtime.
``compress`` never imports ``exporters``; the CLI is the one place that uses both.
"""

__version__ = "0.1.0"
