"""``dqrm-compress report``: one self-contained HTML page about an artifact directory.

The page (inline CSS and SVG, no script, nothing loaded from the network) shows the plan with the
bytes of every table before and after, the quality metrics, the fine-tuning curves with the
checkpoint's score on the same rows, each table's reconstruction error, ROC and calibration
curves of the baseline and the compressed model, the ONNX Runtime parity figures and the
provenance; what the artifacts do not hold is listed as not recorded.

Modules: :mod:`~exporters.report.inputs` (the files it reads), :mod:`~exporters.report.data`
(their content as plain data), :mod:`~exporters.report.plots` (matplotlib to SVG),
:mod:`~exporters.report.html` (the page) and :mod:`~exporters.report.render` (the entry points:
:func:`~exporters.report.render.write_report_file` for the command,
:func:`~exporters.report.render.report_writer` for the export). matplotlib, the optional
``report`` extra, is imported only when a report is drawn.
"""
