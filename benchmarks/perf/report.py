"""The printed report (absolute numbers, then the ratio table) and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.perf.settings import RATIO_KEYS, TARGETS


def ratio_table(report: dict[str, Any]) -> str:
    lines = [f"{'ratio':<48}{'value':>9}{'target':>9}  met"]
    for key in RATIO_KEYS:
        value = report["ratios"].get(key)
        target = TARGETS.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        met = report["met"].get(key)
        flag = "" if met is None else ("yes" if met else "NO")
        lines.append(f"{key:<48}{shown:>9}{'' if target is None else f'<= {target}':>9}  {flag}")
    return "\n".join(lines)


def seconds_table(seconds: dict[str, float]) -> str:
    return "\n".join(f"  {k:<28}{v * 1e3:>10.3f} ms" for k, v in seconds.items())


def _compare_lines(ref: dict[str, Any]) -> list[str]:
    now, old = ref["now"], ref["at_ref"]
    return [
        f"against revision {ref['ref']} ({ref['commit'][:10]}): fit_step/plain_forward "
        f"{old['fit_step/plain_forward']:.3f} then, {now['fit_step/plain_forward']:.3f} now "
        f"(speedup {ref['speedup fit_step (ref/now)']:.3f}); noised_forward/plain_forward "
        f"{old['noised_forward/plain_forward']:.3f} then, "
        f"{now['noised_forward/plain_forward']:.3f} now"
    ]


def _logging_lines(logging: dict[str, Any]) -> list[str]:
    return [
        f"logging ({label}, {c['n_hooks']} hooks): history record "
        f"{c['record_seconds'] * 1e3:.2f} ms, {c['record_json_bytes']} bytes; checkpoint "
        f"{c['checkpoint_seconds'] * 1e3:.1f} ms (every 50 steps by default)"
        for label, c in logging.items()
    ]


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    if "fit_step" not in mem:
        return []
    f, b = mem["fit_step"], mem["forward_backward"]
    return [
        f"memory: fit step +{f['delta_mb']:.1f} MiB (peak {f['peak_mb']:.0f}), "
        f"forward+backward +{b['delta_mb']:.1f} MiB (peak {b['peak_mb']:.0f}); {mem['method']}"
    ]


def _scaling_lines(sc: dict[str, Any]) -> list[str]:
    if not sc:
        return []
    lines = [f"scaling (plain forward {sc['plain_forward'] * 1e3:.2f} ms):"]
    for name, row in sc["hooks"].items():
        lines.append(
            f"  {name:<10} {row['points']:>3} points: noised forward "
            f"{row['noised_forward'] * 1e3:8.2f} ms, fit step {row['fit_step'] * 1e3:8.2f} ms"
        )
    for key in (
        "extra_hook_point_step_seconds (hook_z slope)",
        "extra_hook_point_step_seconds (many hooks, mean)",
        "extra_hook_point_forward_seconds (many hooks, mean)",
    ):
        lines.append(f"  {key.replace('_seconds', '')}: {sc[key] * 1e3:.3f} ms")
    for n, row in sc.get("layers", {}).items():
        if isinstance(row, dict):
            lines.append(
                f"  {n:>2} layers: plain forward {row['plain_forward'] * 1e3:8.2f} ms, "
                f"fit step {row['fit_step'] * 1e3:8.2f} ms ({row['fit_step/plain_forward']:.2f}x)"
            )
    return lines


def _tl3_lines(tl3: dict[str, Any]) -> list[str]:
    if "tl3" not in tl3:
        return []
    row = tl3["tl3"]
    return [
        f"TransformerLens {row['transformer_lens']} ({row['model']}): "
        + ", ".join(f"{k} {row[k] * 1e3:.2f} ms" for k in tl3["tl4"])
    ]


def _answer_lines(ans: dict[str, Any]) -> list[str]:
    if "k" not in ans:
        return []
    when = ans.get("time_to_answer")
    patching = "; ".join(
        f"{label.replace('_', ' ')} {ans[label]['seconds']:.2f} s (AUC {ans[label]['auc']:.3f})"
        for label in ("activation_patching", "attribution_patching")
    )
    return [
        f"time to answer ({ans['model']}, top-{ans['k']} stable {ans['window']} steps): "
        + ("never" if when is None else f"{when:.2f} s at step {ans['answer_step']}")
        + f" (fit of {ans['steps']} steps {ans['fit_seconds_total']:.2f} s, returned after "
        f"{ans['fit_return_seconds']:.2f} s with its refinement; AUC "
        f"{ans['tl_noise_auc']:.3f}); {patching}"
    ]


def details(report: dict[str, Any]) -> str:
    """The absolute numbers behind the ratios, one block per section that ran."""
    lines = _compare_lines(report["compare_ref"]) if "compare_ref" in report else []
    lines += _logging_lines(report.get("logging", {}))
    lines += _memory_lines(report.get("memory", {}))
    lines += _scaling_lines(report.get("scaling", {}))
    lines += _tl3_lines(report.get("tl3", {}))
    lines += _answer_lines(report.get("answer", {}))
    return "\n".join(lines)


def finite(value: Any) -> Any:
    """NaN and infinities as strings, tuples and sets as lists: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), indent=2, default=str) + "\n")
    return path
