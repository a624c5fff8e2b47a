"""The report's files in an artifact directory: their names and the version of their content.

One home for what the writer (:mod:`compress.report_data`, :mod:`exporters.artifacts.write`) and
the reader (:mod:`exporters.report`) must agree on; nothing here imports torch, so reading a
report needs numpy alone.
"""

from __future__ import annotations

#: The measurements the report draws beyond the manifest (:mod:`compress.report_data`).
REPORT_DATA_FILE = "report_data.json"
#: The version of ``report_data.json``'s content that this tool writes and reads.
REPORT_DATA_VERSION = 1
#: The self-contained HTML report the main job writes beside the manifest.
REPORT_HTML = "report.html"
#: Fine-tuning evaluations, one JSON object a line (:mod:`exporters.artifacts.write`).
TRAIN_LOG_FILE = "train_log.jsonl"
