"""Turn benchmarks/results/*.json into SUMMARY.md and PNG plots.

    python benchmarks/report.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORDER = ["full", "no_contrastive", "no_g2g", "no_g2l", "no_t2v", "no_v2t", "text_only", "image_only",
         "spacy_entity_linker"]


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def accuracy_section(data: dict) -> list:
    lines = [
        "## Accuracy on Clipart-MEL (test split)",
        "",
        f"`python benchmarks/accuracy.py` — config `{data['config']}`, seeds {data['seeds']}, "
        f"{data['machine']['device']}, {data['date']}. Mean ± standard deviation over seeds (%).",
        "",
        "| variant | Hits@1 | Hits@3 | Hits@5 | Hits@10 | Hits@20 | MRR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in [n for n in ORDER if n in data["results"]]:
        summary = data["results"][name]["summary"]
        cells = []
        for key in ("m3el_hits1", "m3el_hits3", "m3el_hits5", "m3el_hits10", "m3el_hits20", "m3el_mrr"):
            stat = summary.get(key)
            cells.append("n/a" if stat is None else f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "spaCy's `entity_linker` returns one id and no ranking: only Hits@1 is defined.", "",
              "![ablations](accuracy_ablations.png)", ""]
    names = [n for n in ORDER if n in data["results"]]
    means = [100 * data["results"][n]["summary"]["m3el_hits1"]["mean"] for n in names]
    errors = [100 * data["results"][n]["summary"]["m3el_hits1"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(names, means, yerr=errors, color=["#2b6cb0" if n == "full" else "#a0aec0" for n in names], capsize=3)
    ax.set_ylabel("Hits@1 (%)")
    ax.set_title("Clipart-MEL test Hits@1, mean ± std over seeds")
    ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_ablations.png", dpi=110)
    plt.close(fig)
    return lines


def speed_section(data: dict) -> list:
    machine = data["machine"]
    where = machine["gpu"] or f"CPU, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads"
    lines = [
        "## Linking cost against KB size",
        "",
        f"`python benchmarks/speed.py` — {where}, {data['date']}. KB-side cost per mention "
        "(mention encoding excluded), synthetic entity features with the default backbone's shapes.",
        "",
        "| entities | paper protocol (s/mention) | two-stage, K=64 (s/mention) | speed-up | top-1 agreement (synthetic) |",
        "|---|---|---|---|---|",
    ]
    for row in data["scaling"]:
        paper = row.get("paper_s_per_mention")
        paper_cell = "not run" if paper is None else f"{paper:.4f}"
        speedup = "—" if paper is None else f"{row['speedup']:.0f}x"
        agree = "—" if paper is None else pct(row.get("agreement_synthetic"))
        lines.append(
            f"| {row['entities']:,} | {paper_cell} | {row['two_stage_s_per_mention']:.5f} | {speedup} | {agree} |"
        )
    lines.append("")
    lines.append(f"Entity cache: {data['scaling'][0]['cache_bytes_per_entity_fp16']:,} bytes per entity (fp16, "
                 f"40 text tokens, 49 patches). Peak RSS of the run: {data['peak_rss_mb']:.0f} MB.")
    agreement = data.get("agreement_clipart_mel")
    if agreement:
        lines += [
            "",
            f"Agreement with the exhaustive ranking on Clipart-MEL ({agreement['mentions']} test mentions, "
            f"{agreement['entities']} entities, trained demo pipeline; dense candidates only, no alias table):",
            "",
            "| K | top-1 agreement | Hits@1 | s/mention |",
            "|---|---|---|---|",
            f"| all (exhaustive) | 100.00 | {pct(agreement['exhaustive_hits1'])} | {agreement['exhaustive_s_per_mention']:.4f} |",
        ]
        for key in sorted((k for k in agreement if k.startswith("k")), key=lambda k: int(k[1:])):
            row = agreement[key]
            lines.append(f"| {key[1:]} | {pct(row['agreement'])} | {pct(row['hits1'])} | {row['s_per_mention']:.4f} |")
    throughput = data.get("pipe_throughput")
    if throughput:
        lines += ["", f"End to end, `nlp.pipe` with the default backbone encoding every mention's text and image "
                      f"against a {throughput['entities']:,}-entity KB: **{throughput['docs_per_s']:.1f} docs/s** "
                      f"({throughput['note']})."]
    lines += ["", "![time vs KB size](speed_vs_kb_size.png)", ""]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sizes = [r["entities"] for r in data["scaling"]]
    ax.loglog(sizes, [r["two_stage_s_per_mention"] for r in data["scaling"]], "o-", label="two-stage (K=64)")
    paper = [(r["entities"], r["paper_s_per_mention"]) for r in data["scaling"] if r.get("paper_s_per_mention")]
    if paper:
        ax.loglog(*zip(*paper), "s-", label="paper protocol (exhaustive)")
    ax.set_xlabel("KB entities")
    ax.set_ylabel("seconds per mention")
    ax.set_title(f"Linking cost ({'GPU' if machine['gpu'] else 'CPU'})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "speed_vs_kb_size.png", dpi=110)
    plt.close(fig)
    return lines


def component_section(data: dict) -> list:
    return [
        "## Component cost (default backbone, CPU)",
        "",
        f"`python benchmarks/component_cost.py` — {data['machine']['cpu_count']} cores, {data['date']}.",
        "",
        f"- forward of backbone + matcher, 32 mentions x 32 entities: {data['forward_32x32_s']:.2f} s",
        f"- entity cache for {data['entities']:,} entities: {data['entity_cache_build_s']:.1f} s to build, "
        f"{data['cache_bytes_per_entity']:,.0f} bytes per entity on disk (fp16 `.npy`), "
        f"{data['kb_bytes_per_entity_with_images']:,.0f} bytes per entity with its image",
        f"- `nlp.pipe` against that KB: {data['pipe_docs_per_s']:.1f} docs/s",
        "",
    ]


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from the JSON files here.", ""]
    for name, section in (("accuracy.json", accuracy_section), ("speed.json", speed_section),
                          ("component_cost.json", component_section)):
        path = RESULTS / name
        if path.exists():
            lines += section(json.loads(path.read_text()))
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print(f"Wrote {RESULTS / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
