"""The report of `taxiway bench soak` (``bench.soak``): its Structs, the targets, the table and the plot."""

from __future__ import annotations

from pathlib import Path

import msgspec

RSS_GROWTH_TARGET_PCT = 5.0


class SoakParams(msgspec.Struct):
    num_requests: int
    concurrency: int
    model: str
    embedding_model: str | None  # None: not served, its share went to chat
    prompt_words: list[int]  # low, high
    max_tokens: list[int]
    seed: int
    warmup_fraction: float
    sample_s: float
    settle_s: float


class Sample(msgspec.Struct, array_like=True):
    t_s: float  # from the load's start
    num_done: int
    rss_bytes: int
    num_fds: int
    kv_blocks_used: int  # -1: no stats


class SoakReport(msgspec.Struct):
    date: str
    machine: str
    command: str
    params: SoakParams
    duration_s: float
    requests_per_s: float
    statuses: dict[str, int]  # HTTP status (or "transport_error") → count
    by_kind: dict[str, dict[str, int]]
    num_5xx: int
    num_stream_errors: int  # 200 streams ended by an error event
    num_truncated: int  # 200 streams without [DONE] (not counting the disconnects)
    num_unexpected: int  # an invalid request answered 2xx, or a valid one answered 4xx
    num_transport_errors: int
    kv_blocks_used_end: int
    kv_blocks_total: int
    rss_start_bytes: int
    rss_warm_bytes: int  # at the end of the warm-up
    rss_end_bytes: int
    rss_peak_after_warm_bytes: int
    rss_growth_pct: float  # end vs the end of the warm-up
    fds_start: int
    fds_end: int
    server_exit_code: int | None
    load_average_before: list[float]
    load_average_after: list[float]
    first_errors: list[str]
    samples: list[Sample]


def missed_targets(r: SoakReport) -> list[str]:
    missed = []
    if r.num_5xx:
        missed.append(f"{r.num_5xx} responses 5xx")
    if r.num_stream_errors or r.num_truncated or r.num_transport_errors or r.num_unexpected:
        missed.append("broken or unexpected responses")
    if r.kv_blocks_used_end > 0:
        missed.append(f"{r.kv_blocks_used_end} KV blocks in use at the end")
    if r.rss_growth_pct >= RSS_GROWTH_TARGET_PCT:
        missed.append(f"RSS grew {r.rss_growth_pct:.1f}% after warm-up")
    if r.fds_end > r.fds_start:
        missed.append(f"open fds {r.fds_start} → {r.fds_end}")
    return missed



def format_report(r: SoakReport) -> str:
    mib = 2**20
    missed = missed_targets(r)
    rows = [
        f"taxiway bench soak — {r.date} — {r.machine} — load average {r.load_average_before[0]:.2f} before, "
        f"{r.load_average_after[0]:.2f} after",
        f"{r.params.num_requests} requests at C={r.params.concurrency} on `{r.params.model}` "
        f"(embeddings: {r.params.embedding_model or 'not served'}) in {r.duration_s:.0f} s ({r.requests_per_s:.1f} req/s)",
        "",
        "| kind | " + " | ".join(sorted(r.statuses)) + " |",
        "|---|" + "---|" * len(r.statuses),
    ]
    for kind, counts in r.by_kind.items():
        rows.append(f"| {kind} | " + " | ".join(str(counts.get(s, 0)) for s in sorted(r.statuses)) + " |")
    rows += [
        "",
        f"5xx: {r.num_5xx}; stream error events: {r.num_stream_errors}; truncated: {r.num_truncated}; "
        f"unexpected status: {r.num_unexpected}; transport errors: {r.num_transport_errors}",
        f"KV blocks in use at the end: {r.kv_blocks_used_end} of {r.kv_blocks_total}",
        f"RSS: start {r.rss_start_bytes / mib:.0f} MiB, after warm-up {r.rss_warm_bytes / mib:.0f} MiB, "
        f"end {r.rss_end_bytes / mib:.0f} MiB (growth {r.rss_growth_pct:+.2f}%; "
        f"peak {r.rss_peak_after_warm_bytes / mib:.0f} MiB)",
        f"open fds: {r.fds_start} at the start, {r.fds_end} at the end; server exit code {r.server_exit_code}",
        "targets: " + ("all met" if not missed else "missed — " + "; ".join(missed)),
    ]
    rows += [f"error: {e}" for e in r.first_errors]
    return "\n".join(rows)


def write_plot(r: SoakReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: a smaller, greppable SVG
    t = [s.t_s / 60 for s in r.samples]
    warm_t = next((s.t_s / 60 for s in r.samples if s.rss_bytes == r.rss_warm_bytes), None)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=(3, 2))
    top.plot(t, [s.rss_bytes / 2**20 for s in r.samples], color="tab:blue", linewidth=1.2)
    top.set_ylabel("server RSS (MiB)")
    top.set_ylim(bottom=0)
    top.set_title(f"taxiway bench soak: {r.params.num_requests} requests, C={r.params.concurrency}, "
                  f"RSS growth after warm-up {r.rss_growth_pct:+.2f}%", fontsize=10)  # fmt: skip
    bottom.plot(t, [s.num_fds for s in r.samples], color="tab:green", label="open fds", linewidth=1.2)
    bottom.plot(t, [max(0, s.kv_blocks_used) for s in r.samples], color="tab:red", label="KV blocks in use", linewidth=1.2)
    bottom.set_ylabel("count")
    bottom.set_xlabel("minutes from the load's start")
    bottom.legend(loc="upper right", fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if warm_t is not None:
            ax.axvline(warm_t, color="grey", linestyle="--", linewidth=0.8)
    top.annotate("end of warm-up", (warm_t or 0, 0), xytext=(4, 6), textcoords="offset points", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
