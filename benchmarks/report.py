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


def where(machine: dict) -> str:
    """The GPU model, else the CPU and its threads (older files lack some keys)."""
    cores = f", {machine['cpu_count']} cores" if machine.get("cpu_count") else ""
    return machine.get("gpu") or f"CPU{cores}, {machine['torch_threads']} torch threads"


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


def speed_section(data: dict, plot: str) -> list:
    machine = data["machine"]
    lines = [
        f"## Linking cost against KB size ({'GPU' if machine['gpu'] else 'CPU'})",
        "",
        f"`python benchmarks/speed.py` — {where(machine)}, {data['date']}. KB-side cost per mention "
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
    first = data["scaling"][0]
    lines.append(
        f"Entity cache: {first['cache_bytes_per_entity_fp16']:,} bytes per entity (fp16, G2L queries pooled to "
        f"{first['max_cached_queries']} per modality; {first['cache_bytes_per_entity_fp16_all_queries']:,} bytes "
        f"with all 40 text tokens and 49 patches), memory-mapped: the rerank reads its K rows from disk. "
        f"Peak RSS of the run: {data['peak_rss_mb']:.0f} MB."
    )
    agreement = data.get("agreement_clipart_mel")
    if agreement:
        ks = sorted((k for k in agreement["caches"][0] if k.startswith("k")), key=lambda k: int(k[1:]))
        lines += [
            "",
            f"Two-stage top-1 against the exhaustive ranking with the exact (training) score on Clipart-MEL "
            f"({agreement['mentions']} test mentions, {agreement['entities']} entities, trained demo pipeline; "
            f"dense candidates only, no alias table). Exhaustive Hits@1 {pct(agreement['exhaustive_hits1'])} "
            f"({agreement['exhaustive_s_per_mention']:.4f} s/mention). Cells: agreement / Hits@1.",
            "",
            "| G2L queries cached per modality | bytes/entity | " + " | ".join(f"K={k[1:]}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for cache in agreement["caches"]:
            cells = [f"{pct(cache[k]['agreement'])} / {pct(cache[k]['hits1'])}" for k in ks]
            queries = cache["max_cached_queries"] or "all (exact)"
            lines.append(f"| {queries} | {cache['bytes_per_entity']:,} | " + " | ".join(cells) + " |")
    for key in ("pipe_throughput", "pipe_throughput_pooled"):
        throughput = data.get(key)
        if throughput:
            backbone = throughput.get("backbone", "default")
            queries = throughput.get("max_cached_queries")
            cache = "exact entity cache" if queries is None else f"entity cache pooled to {queries} G2L queries"
            lines += ["", f"End to end, `nlp.pipe` with the {backbone} backbone encoding every mention's text "
                          f"and image against a {throughput['entities']:,}-entity KB, {cache}: "
                          f"**{throughput['docs_per_s']:.1f} docs/s**, {1 / throughput['docs_per_s']:.4f} s per "
                          f"mention ({throughput['note']})."]
    lines += ["", f"![time vs KB size]({plot})", ""]
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
    fig.savefig(RESULTS / plot, dpi=110)
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


def priors_section(data: dict) -> list:
    """Hits@1 of the alias prior, M3EL alone and M3EL + features; ECE and NIL."""
    names = {"alias_prior": "alias prior alone", "m3el_alone": "M3EL alone (paper score, calibrated)",
             "m3el_features": "M3EL + candidate features (default)"}

    def cell(summary: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
        no_nil = key.startswith("m3el_nil") and not summary.get("m3el_n_nil", {}).get("mean")
        if key not in summary or no_nil:
            return "n/a"
        return f"{scale * summary[key]['mean']:.{digits}f} ± {scale * summary[key]['std']:.{digits}f}"

    lines = [
        f"## Priors, calibration and NIL ({where(data['machine'])})",
        "",
        f"`python benchmarks/priors.py --seeds {' '.join(map(str, data['seeds']))} --max-epochs "
        f"{data['max_epochs']}` — {data['date']}; `{data['config']}`, test split, mean ± std over the seeds.",
        "",
        "| data | model | Hits@1 | MRR | accuracy (NIL incl.) | ECE | NIL P | NIL R | NIL F |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, variants in data["results"].items():
        for variant, result in variants.items():
            summary = result["summary"]
            lines.append(
                f"| {dataset} | {names.get(variant, variant)} | {cell(summary, 'm3el_hits1')} | "
                f"{cell(summary, 'm3el_mrr')} | {cell(summary, 'm3el_accuracy')} | "
                f"{cell(summary, 'm3el_ece', 1.0, 3)} | {cell(summary, 'm3el_nil_p')} | "
                f"{cell(summary, 'm3el_nil_r')} | {cell(summary, 'm3el_nil_f')} |")
    return lines + ["", *(f"- {k}: {v}" for k, v in data["datasets"].items()), ""]


def shared_transformer_section(data: dict) -> list:
    """One transformer shared by ner and the linker vs two text encoders."""
    lines = [
        f"## One shared transformer ({where(data['run']['machine'])})",
        "",
        f"`python benchmarks/shared_transformer.py` — {data['run']['date']}. {data['inputs']}.",
        "",
        "| pipeline | text encoders (params) | torch params | RSS after linking MB | docs/s | CPU ms/doc "
        "| Hits@1 (gold mentions) | ner F | nel_micro_f (end to end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("shared", "two_encoders"):
        row = data[name]
        lines.append(
            f"| {name} | {row['text_encoders']} ({row['text_encoder_params'] / 1e6:.1f} M) "
            f"| {row['torch_params'] / 1e6:.1f} M | {row['rss_mb']['after_linking']:.0f} "
            f"| {row['speed']['docs_per_s']:.2f} | {row['speed']['cpu_ms_per_doc']:.1f} "
            f"| {pct(row['gold_mentions']['m3el_hits1'])} | {pct(row['end_to_end']['ents_f'])} "
            f"| {pct(row['end_to_end']['nel_micro_f'])} |")
    ratios = ", ".join(f"{key} {value}" for key, value in data["ratios"].items())
    return lines + ["", f"Ratios: {ratios}.", ""]


def training_section(data: dict) -> list:
    lines = [
        f"## Training throughput ({where(data['machine'])})",
        "",
        f"`python benchmarks/training_throughput.py` — {data['date']}; {data['backbone']}, batch "
        f"{data['batch_size']}, {data['steps']} timed steps; {data['end_to_end']}.",
        "",
        "| precision | mentions/s |",
        "|---|---|",
    ]
    for precision, row in data["results"].items():
        lines.append(f"| {precision} | {row['mentions_per_s']:.1f} |")
    return lines + [""]


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from the JSON files here.", ""]
    sections = [("accuracy.json", accuracy_section),
                ("speed.json", lambda data: speed_section(data, "speed_vs_kb_size.png")),
                ("speed_cuda.json", lambda data: speed_section(data, "speed_vs_kb_size_cuda.png")),
                ("component_cost.json", component_section),
                ("priors.json", priors_section),
                ("shared_transformer.json", shared_transformer_section),
                ("training_throughput_cuda.json", training_section),
                ("training_throughput_cpu.json", training_section)]
    for name, section in sections:
        path = RESULTS / name
        if path.exists():
            lines += section(json.loads(path.read_text()))
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print(f"Wrote {RESULTS / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
