"""The main job's report: stage timings, the ``--max-auc-drop`` check, and the before/after table."""

from __future__ import annotations

from compress.io.summary import format_bytes

#: The stages of the main job, in the order ``timings`` lists them.
STAGES = (
    "load",
    "plan",
    "data",
    "evaluate",
    "quantize",
    "finetune",
    "convert",
    "control",
    "report",
    "export",
    "parity",
)


def stage_timings(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per stage in :data:`STAGES` order, in whole milliseconds rounded down (so that they
    never add up to more than the command's ``seconds``)."""
    from compress.timings import StageTimer

    ordered = sorted(seconds, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
    return StageTimer({k: seconds[k] for k in ordered}).rounded()


def auc_drop_failure(metrics: dict, max_auc_drop: float | None) -> str | None:
    """The one-line reason ``--max-auc-drop`` fails (``None`` when it passes or is not set): the
    compressed AUC more than ``max_auc_drop`` below the baseline's, both on the report slice."""
    if max_auc_drop is None:
        return None
    baseline, compressed = metrics.get("baseline"), metrics.get("compressed")
    if baseline is None or compressed is None:
        return "--max-auc-drop: no validation data, AUC not measured"
    drop = baseline["auc"] - compressed["auc"]
    if drop <= max_auc_drop:
        return None
    return (
        f"compressed AUC {compressed['auc']:.4f} is {drop:.4f} below the baseline "
        f"{baseline['auc']:.4f}, more than --max-auc-drop {max_auc_drop:g}"
    )


def _slice_lines(s: dict) -> list[str]:
    """Which validation rows the metrics are on and which chose the kept fine-tuning step."""
    lines = []
    if s.get("metrics_on"):
        on = s["metrics_on"]
        lines.append(f"metrics on {on['slice']} ({on['rows']:,} rows, never used for selection)")
    train = s.get("train") or {}
    if train.get("selected_on"):
        sel = train["selected_on"]
        lines.append(
            f"kept fine-tuning step {train['best_step']} of {train['steps']}: best {sel['metric']} "
            f"on {sel['slice']} ({sel['rows']:,} rows)"
        )
    return lines


def _distributed_line(d: dict) -> str:
    """How a data-parallel fine-tuning run exchanged gradients (``--json``'s ``distributed``)."""
    widths = f"INT{d['embedding_grad_bits']}" if d["embedding_grad_bits"] == 8 else "FP32"
    mlp = f"INT{d['mlp_grad_bits']}" if d["mlp_grad_bits"] == 8 else "FP32"
    return (
        f"fine-tuned on {d['world_size']} workers ({d['backend']}): embedding rows {widths}, MLP "
        f"{mlp}; {format_bytes(int(d['bytes_per_step']))} sent per worker and step, "
        f"{d['dense_over_sent']:,.0f}x less than a dense FP32 all-reduce"
    )


def format_before_after(s: dict) -> str:
    rows = [(f"baseline ({s['baseline_precision']})", s["metrics"]["baseline"], s["bytes_before"])]
    if s["metrics"].get("before_finetune") is not None:
        rows.append(
            ("compressed, before fine-tuning", s["metrics"]["before_finetune"], s["bytes_after"])
        )
    rows.append((f"compressed ({s['recipe']})", s["metrics"]["compressed"], s["bytes_after"]))
    control = s["metrics"].get("control")
    if "control" in s["metrics"]:  # --control: the same fine-tuning, nothing compressed
        rows.append(
            (f"control ({s['baseline_precision']}, same fine-tuning)", control, s["bytes_before"])
        )
    lines = [f"{'model':<32}{'auc':>8}{'logloss':>9}{'accuracy':>10}{'size':>13}"]
    for name, m, size in rows:
        if m is None:
            lines.append(f"{name:<32}{'-':>8}{'-':>9}{'-':>10}{format_bytes(size):>13}")
        else:
            lines.append(
                f"{name:<32}{m['auc']:>8.4f}{m['logloss']:>9.4f}{m['accuracy']:>10.4f}"
                f"{format_bytes(size):>13}"
            )
    compressed = s["metrics"]["compressed"]
    if control is not None and compressed is not None:
        lines.append(
            f"compressed - control: AUC {compressed['auc'] - control['auc']:+.4f}, log loss "
            f"{compressed['logloss'] - control['logloss']:+.4f} (the cost of compression alone)"
        )
    lines += _slice_lines(s)
    if s.get("distributed"):
        lines.append(_distributed_line(s["distributed"]))
    lines.append(f"ratio {s['ratio']:.2f}x   artifacts: {s['out']}")
    if s.get("report"):
        lines.append(f"report: {s['report']}")
    if s.get("onnx_max_abs_diff"):
        worst = max(s["onnx_max_abs_diff"].values())
        lines.append(
            f"ONNX Runtime parity: max |logit difference| vs PyTorch {worst:.2g} (limit 1e-5)"
        )
    return "\n".join(lines)
