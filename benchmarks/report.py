"""The benchmark's JSON result as a markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path

from dia2_trt.runtime.files import write_atomic

GIB = 2**30
_PARTS = ("backbone", "depformer", "codec", "host")


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3g}"


def _steady(result: dict) -> int:
    return max((c.get("steady_from_frame", 0) for c in result["contenders"]), default=0)


def _frames(value: float | None) -> str:
    """Time to first audio in steady frame-times (TTFA over the median frame)."""
    return "n/a" if value is None else f"{value:.1f}"


def _range(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """median [p10–p90]"""
    if s is None:
        return "n/a"
    return f"{s['median'] * scale:.{digits}f} [{s['p10'] * scale:.{digits}f}–{s['p90'] * scale:.{digits}f}]"


def markdown(result: dict) -> str:
    settings, bw = result["settings"], result["bandwidth"]
    lines = [
        f"Text: {settings['text']!r}; seed {settings['seed']}; up to {settings['frames']} frames x "
        f"{settings['repeats']} repeats per contender ({settings['schedule']}, warm-up of "
        f"{settings['warmup_frames']} frames excluded). Memory read bandwidth (best of "
        f"{bw['repeats']}): {bw['read_bytes_per_second'] / 1e9:.1f} GB/s. First audio frames: time to first "
        f"audio over the median frame. Frame, component and roofline figures: the steady frames (from frame "
        f"{_steady(result)}, where every component runs every frame). Roofline: the weight bytes of each "
        f"contender's own graphs.",
        "",
        "| contender | frames/s median [p10–p90] | RTF | first audio ms | first audio frames "
        "| frame ms median [p10–p90] "
        "| backbone ms | depformer ms | codec ms | host ms | peak RSS GiB | roofline ms | of roofline "
        "| vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["contenders"]:
        b, line = c["breakdown_seconds_per_frame"], c["roofline"]
        speedup = f"{c['speedup_vs_reference']:.1f}x" if c["speedup_vs_reference"] is not None else "n/a"
        lines.append(
            f"| {c['name']} | {_range(c['frames_per_second'], digits=1)} "
            f"| {_range(c['real_time_factor'])} | {_range(c['first_audio_seconds'], 1e3, 0)} "
            f"| {_frames(c.get('first_audio_frame_times'))} "
            f"| {_range(c['frame_seconds'], 1e3, 1)} | "
            + " | ".join(_ms(b[p]) for p in _PARTS)
            + f" | {c['peak_rss_bytes'] / GIB:.2f} | {_ms(line['min_frame_seconds'])} "
            f"| {line['achieved_over_roofline'] * 100:.0f}% | {speedup} |")
    if result["skipped"]:
        lines.append("")
    lines += [f"- skipped {s['contender']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> list[Path]:
    """latency.png (per-frame latency per contender) and breakdown.png (stacked time per frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = result["contenders"]
    names = [c["name"] for c in contenders]
    paths = [out / "latency.png", out / "breakdown.png"]

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4))
    ax.boxplot([[s * 1e3 for s in c["raw"]["frame_seconds"]] for c in contenders], whis=(10, 90),
               showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per steady frame (box: IQR, whiskers: p10/p90)")
    ax.set_title("per-frame latency")
    fig.tight_layout()
    write_atomic(paths[0], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    fig, (ax, share) = plt.subplots(1, 2, figsize=(3.2 * len(names) + 4, 4))
    totals = [sum(c["breakdown_seconds_per_frame"][p] for p in _PARTS) for c in contenders]
    bottom, shares = [0.0] * len(contenders), [0.0] * len(contenders)
    for part in _PARTS:
        values = [c["breakdown_seconds_per_frame"][part] * 1e3 for c in contenders]
        ax.bar(names, values, bottom=bottom, label=part)
        fractions = [100 * v / (t * 1e3) for v, t in zip(values, totals)]
        share.bar(names, fractions, bottom=shares, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
        shares = [b + f for b, f in zip(shares, fractions)]
    ax.scatter(names, [c["roofline"]["min_frame_seconds"] * 1e3 for c in contenders], marker="_", s=600,
               color="black", label="roofline (weights)", zorder=3)
    ax.set_ylabel("ms per frame (median over repeats)")
    ax.set_title("where a frame's time goes")
    ax.legend(fontsize=8)
    share.set_ylabel("% of the frame")
    share.set_title("share per component")
    fig.tight_layout()
    write_atomic(paths[1], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return paths
