"""Turn benchmarks/results/*.json into SUMMARY.md and PNG plots.

    python benchmarks/report.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORDER = ["full", "no_picture_gate", "no_picture_variation", "no_contrastive", "no_g2g", "no_g2l", "no_t2v",
         "no_v2t", "text_only", "image_only", "spacy_entity_linker"]
CONDITIONS = ("given", "none", "half", "shuffled")


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def where(machine: dict) -> str:
    """The GPU model, else the CPU and its threads (older files lack some keys)."""
    cores = f", {machine['cpu_count']} cores" if machine.get("cpu_count") else ""
    return machine.get("gpu") or f"CPU{cores}, {machine['torch_threads']} torch threads"


def picture_conditions_table(data: dict) -> list:
    """Accuracy (NIL included) per picture condition, ECE with the pictures
    given, and the share of linkable mentions answered NIL without pictures."""
    names = [n for n in ORDER if n in data["results"]
             and "given/m3el_accuracy" in data["results"][n]["summary"]]
    if not names:
        return []

    def cell(summary: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
        stat = summary.get(key)
        return "n/a" if stat is None else f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"

    lines = ["Answers (accuracy, NIL included) under the four picture conditions, the same test mentions "
             "(`evaluate --pictures all`, seed 0 for half and shuffled):", "",
             "| variant | " + " | ".join(f"{c} accuracy" for c in CONDITIONS) + " | given ECE | none: NIL on linkable |",
             "|---|" + "---|" * (len(CONDITIONS) + 2)]
    for name in names:
        summary = data["results"][name]["summary"]
        cells = [cell(summary, f"{c}/m3el_accuracy") for c in CONDITIONS]
        cells += [cell(summary, "given/m3el_ece", 1.0, 3), cell(summary, "none/m3el_nil_on_linkable")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def accuracy_section(data: dict, plot: bool = True) -> list:
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
    lines += ["", "spaCy's `entity_linker` returns one id and no ranking: only Hits@1 is defined.", ""]
    lines += picture_conditions_table(data)
    if not plot:
        return lines
    lines += ["![ablations](accuracy_ablations.png)", ""]
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
        f"## Paper protocol vs two-stage against KB size ({'GPU' if machine['gpu'] else 'CPU'})",
        "",
        f"`python benchmarks/speed.py` — {where(machine)}, {data['date']}. KB-side cost per mention (mention "
        "encoding excluded), synthetic entity features with the default backbone's shapes, exact cache "
        "memory-mapped; one timed run per cell, cold = cache pages evicted first.",
        "",
        "| entities | paper protocol, batch 1 (s/mention) | two-stage K=64, batch 1 cold / warm | "
        "batch 32 cold / warm | speed-up (batch 1, warm) |",
        "|---|---|---|---|---|",
    ]
    for row in data["scaling"]:
        paper = row.get("paper_batch1_s_per_mention")
        cells = [f"{row[f'two_stage_batch{b}']['cold_s_per_mention']:.5f} / "
                 f"{row[f'two_stage_batch{b}']['warm_s_per_mention']:.5f}" for b in (1, 32)]
        speedup = "—" if paper is None else f"{row['speedup_batch1_warm']:.0f}x"
        lines.append(f"| {row['entities']:,} | {'not run' if paper is None else f'{paper:.4f}'} | "
                     f"{cells[0]} | {cells[1]} | {speedup} |")
    first = data["scaling"][0]
    lines += ["", f"Entity cache: {first['cache_bytes_per_entity_fp16']:,} bytes per entity (fp16, every G2L "
                  f"query). Peak RSS of the run: {data['peak_rss_mb']:.0f} MB.", "", f"![time vs KB size]({plot})", ""]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sizes = [r["entities"] for r in data["scaling"]]
    for batch in (1, 32):
        ax.loglog(sizes, [r[f"two_stage_batch{batch}"]["warm_s_per_mention"] for r in data["scaling"]], "o-",
                  label=f"two-stage (K=64), batch {batch}, warm")
    paper = [(r["entities"], r["paper_batch1_s_per_mention"]) for r in data["scaling"]
             if r.get("paper_batch1_s_per_mention")]
    if paper:
        ax.loglog(*zip(*paper), "s-", label="paper protocol, batch 1")
    ax.set_xlabel("KB entities")
    ax.set_ylabel("seconds per mention")
    ax.set_title(f"Linking cost ({'GPU' if machine['gpu'] else 'CPU'})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / plot, dpi=110)
    plt.close(fig)
    return lines


def build_section(data: dict) -> list:
    lines = [f"## Entity cache build ({where(data['machine'])})", "",
             f"`python benchmarks/kb_scale.py build` — {data['date']}; {data['entities']:,} entities: "
             f"{data['inputs']}. CPU time includes the image workers.", "",
             "| path | CPU ms/entity | wall ms/entity | CPU speed-up | wall speed-up |", "|---|---|---|---|---|"]
    for row in data["rows"].values():
        lines.append(f"| {row['path']} | {row['cpu_ms_per_entity']:.1f} | {row['wall_ms_per_entity']:.1f} | "
                     f"{row['cpu_speedup']:.2f}x | {row['wall_speedup']:.2f}x |")
    accuracy = data["demo_test"]
    lines += ["", "Demo test split with each precision and runtime (mentions and entity cache encoded in it): " + ", ".join(
        f"{name}: Hits@1 {pct(row['hits1'])}, MRR {pct(row['mrr'])}" for name, row in accuracy.items()) + ".", ""]
    return lines


def build_memory_section(data: dict) -> list:
    killed, resumed = data["killed_run"], data["resumed_run"]
    return [f"## Streamed build of {data['entities']:,} entities ({where(data['machine'])})", "",
            f"`python benchmarks/kb_scale.py memory` — {data['date']}; {data['inputs']}; build_processes "
            f"{data['build_processes']}. Memory: {data['memory']}.", "",
            f"- killed (SIGKILL) after {killed['wall_s']:.0f} s with {killed['shards_kept']} of "
            f"{killed['shards_total']} shards written; peak memory {killed['peak_tree_pss_mb']:.0f} MB",
            f"- the same command again: resumed from those shards and finished in {resumed['wall_s']:.0f} s; "
            f"peak memory {resumed['peak_tree_pss_mb']:.0f} MB (main process alone {resumed['peak_rss_mb']:.0f} MB)",
            f"- cache on disk: {data['cache_bytes_on_disk'] / data['entities']:,.0f} bytes per entity", ""]


def agreement_section(data: dict) -> list:
    lines = [f"## Two-stage vs exhaustive on {data['entities']:,} real entities ({where(data['machine'])})", "",
             f"`python benchmarks/kb_scale.py agreement` — {data['date']}; {data['inputs']}; "
             f"{data['mentions']} mentions, K = {data['k']}. Cache build: "
             f"{data['build']['cpu_ms_per_entity']:.1f} CPU ms/entity.", "",
             "| ranking | Hits@1 | top-1 agreement with exhaustive |", "|---|---|---|"]
    for name, hits in data["hits1"].items():
        agreement = data["agreement_with_exhaustive"].get(name)
        lines.append(f"| {name} | {pct(hits)} | {'—' if agreement is None else pct(agreement)} |")
    recall = data["ann"]["recall"]
    return lines + ["", f"ANN index {data['ann']['factory']}: recall@{recall['k']} {recall['recall']:.4f} on the "
                        f"mentions (nprobe {recall['nprobe']}, shortlist {recall['shortlist']}).", ""]


def retrieval_section(data: dict) -> list:
    ann = data["ann"]
    exact = data["exact"]
    lines = [f"## Top-{data['k']} retrieval over {data['entities']:,} entities ({where(data['machine'])})", "",
             f"`python benchmarks/kb_scale.py retrieval` — {data['date']}; {data['inputs']}; {data['queries']} "
             "queries.", "",
             f"Exact chunked fp16 scan: batch 32 {exact['exact_batch32_cold']['ms_per_mention']:.1f} ms/mention "
             f"cold, {exact['exact_batch32_warm']['ms_per_mention']:.1f} warm; batch 1 "
             f"{exact['exact_batch1_warm']['ms_per_mention']:.1f} warm.", "",
             f"ANN {ann['factory']} + exact rescoring of the shortlist (index {ann['index_bytes_per_entity']:.0f} "
             f"bytes/entity in RAM, built in {ann['build_s']:.0f} s):", "",
             f"| nprobe | shortlist | recall@{data['k']} | batch 32 cold ms/mention | batch 32 warm | batch 1 warm |",
             "|---|---|---|---|---|---|"]
    for row in ann["sweep"]:
        lines.append(f"| {row['nprobe']} | {row['shortlist']} | {row['recall@' + str(data['k'])]:.4f} | "
                     f"{row['batch32_cold']['ms_per_mention']:.2f} | {row['batch32_warm']['ms_per_mention']:.2f} | "
                     f"{row['batch1_warm']['ms_per_mention']:.2f} |")
    return lines + ["", f"RSS growth over the whole run (index + touched rows of the memory map): "
                        f"{data['rss_growth_bytes_per_entity']:.0f} bytes/entity.", ""]


def end_to_end_section(data: dict) -> list:
    lines = [f"## End to end on CPU ({where(data['machine'])})", "",
             f"`python benchmarks/end_to_end.py` — {data['date']}; KB of {data['entities']:,} entities; "
             f"{data['inputs']}.", "", "| precision | nlp.pipe batch | n_process | docs/s | CPU ms/doc |",
             "|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['precision']} | {row['batch_size']} | {row.get('n_process', 1)} | "
                     f"{row['docs_per_s']:.1f} | {row['cpu_ms_per_doc']:.1f} |")
    return lines + [""]


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


def serve_section(data: dict) -> list:
    server, pipe = data["server"], data["nlp_pipe"]
    latency = server["latency_ms"]
    batching = server["batching"]
    return [
        "## Serving over HTTP",
        "",
        f"`python benchmarks/serve_load.py` — {data['run']['date']}. {data['inputs']['what']}; "
        f"{data['inputs']['server']}; feature cache off.",
        "",
        "| runner | rows/s | latency p50 / p95 / p99 ms | CPU ms per row | errors |",
        "|---|---|---|---|---|",
        f"| serve, {server['clients']} clients, {server['seconds']:.0f} s | {server['requests_per_s']:.1f} "
        f"| {latency['p50']:.0f} / {latency['p95']:.0f} / {latency['p99']:.0f} "
        f"| {server['server_cpu_ms_per_request']:.1f} (server) | {server['errors']} of {server['requests']} |",
        f"| nlp.pipe, batch {pipe['batch_size']} | {pipe['docs_per_s']:.1f} | | {pipe['cpu_ms_per_doc']:.1f} | |",
        "",
        f"Server / nlp.pipe: {data['server_vs_pipe']:.2f}; {batching['rows']} rows in {batching['model_calls']} "
        f"model calls (largest {batching['largest_batch']}).",
        "",
    ]


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/report.py` from the JSON files here.", ""]
    sections = [("accuracy.json", accuracy_section),
                ("accuracy_components.json", lambda data: ["### Component ablations", ""]
                 + accuracy_section(data, plot=False)[2:]),
                ("speed.json", lambda data: speed_section(data, "speed_vs_kb_size.png")),
                ("speed_cuda.json", lambda data: speed_section(data, "speed_vs_kb_size_cuda.png")),
                ("kb_build.json", build_section),
                ("kb_build_memory.json", build_memory_section),
                ("kb_agreement.json", agreement_section),
                ("retrieval_1m.json", retrieval_section),
                ("end_to_end.json", end_to_end_section),
                ("component_cost.json", component_section),
                ("priors.json", priors_section),
                ("shared_transformer.json", shared_transformer_section),
                ("serve_load.json", serve_section),
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
