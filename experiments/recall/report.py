"""The report: Markdown tables, the statements computed from the numbers, the PNG plots and
``RESULTS.md``, all from the result dict alone (``recall.json``), so that a saved result
re-renders without training (``--from-json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qdelta_jax import diagnostics

# The command that renders the docs, as RESULTS.md names it.
PROGRAM = "python -m experiments.recall"
COLORS = {"qdelta": "C3", "gdn": "C0", "lam0.5": "C2", "deltanet": "C7", "qdelta-neg": "C1"}


def aggregate(runs: list[dict], key: str) -> dict[tuple, tuple[float, float, int]]:
    """``(variant, task, setting items) -> (mean, std over seeds, n seeds)`` of ``key``."""
    acc: dict[tuple, list[float]] = {}
    for r in runs:
        k = (r["variant"], r["task"], tuple(sorted(r["setting"].items())))
        acc.setdefault(k, []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in acc.items()}


def _metric(task: str) -> str:
    return "exact_match" if task == "niah" else "accuracy"


def _pm(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def _settings(runs, task):
    seen = []
    for r in runs:
        if r["task"] == task and r["setting"] not in seen:
            seen.append(r["setting"])
    return seen


def _skey(setting) -> tuple:
    return tuple(sorted(setting.items()))


def tables(res: dict) -> dict[str, str]:
    """Markdown tables of final recall per variant and setting (mean ± std over seeds)."""
    out = {}
    runs = res["runs"]
    variants = list(res["meta"]["variants"])
    for task in res["meta"]["profile"]["tasks"]:
        metric = _metric(task)
        agg = aggregate([r for r in runs if r["task"] == task], metric)
        sets = _settings(runs, task)
        if task == "mqar":
            heads = [f"T {s['seq_len']}, P {s['num_pairs']}" for s in sets]
        else:
            heads = [f"depth {s['depth']:g}" for s in sets]
        lines = ["| variant | " + " | ".join(heads) + " | mean |",
                 "| --- |" + " --- |" * (len(heads) + 1)]
        for v in variants:
            cells, means = [], []
            for s in sets:
                m, sd, _ = agg[(v, task, _skey(s))]
                best = max(agg[(w, task, _skey(s))][0] for w in variants)
                cell = _pm(m, sd)
                cells.append(f"**{cell}**" if m == best else cell)
                means.append(m)
            lines.append(f"| {res['meta']['variants'][v]} | " + " | ".join(cells)
                         + f" | {100 * np.mean(means):.1f} |")
        out[task] = "\n".join(lines)
    return out


def observations(res: dict) -> list[str]:
    """Plain statements computed from the numbers (the draft of the 'what it says' paragraph)."""
    runs, variants = res["runs"], list(res["meta"]["variants"])
    label = res["meta"]["variants"]
    notes = []
    for task in res["meta"]["profile"]["tasks"]:
        metric = _metric(task)
        agg = aggregate([r for r in runs if r["task"] == task], metric)
        sets = _settings(runs, task)
        what = "recall accuracy" if task == "mqar" else "exact match"
        means = {v: float(np.mean([agg[(v, task, _skey(s))][0] for s in sets])) for v in variants}
        order = sorted(variants, key=lambda v: -means[v])
        notes.append(f"{task.upper()}: mean {what} over settings: " + ", ".join(
            f"{label[v]} {100 * means[v]:.1f}%" for v in order) + ".")
        if "qdelta" in variants:
            losses, ties = [], []
            for s in sets:
                mq, sq, _ = agg[("qdelta", task, _skey(s))]
                for w in variants:
                    if w == "qdelta":
                        continue
                    mw, sw, _ = agg[(w, task, _skey(s))]
                    name = (f"T {s['seq_len']} P {s['num_pairs']}" if task == "mqar"
                            else f"depth {s['depth']:g}")
                    if mw > mq + max(sq, sw):
                        losses.append(f"{name}: {label[w]} {_pm(mw, sw)} vs {_pm(mq, sq)}")
                    elif mw > mq:
                        ties.append(name)
            if losses:
                notes.append(f"{task.upper()}: Q-Delta loses by more than one seed std at: "
                             + "; ".join(losses) + ".")
            else:
                notes.append(f"{task.upper()}: no variant beats Q-Delta by more than one seed "
                             "std in any setting.")
            if ties:
                notes.append(f"{task.upper()}: another variant is ahead of Q-Delta within one "
                             f"seed std at: {', '.join(sorted(set(ties)))}.")
    for v in ("qdelta", "qdelta-neg"):
        for task, s in res.get("diagnostics", {}).get(v, {}).items():
            o = s["overall"]
            notes.append(f"Stability ({label.get(v, v)}, {task}): beta*c in "
                         f"[{o['min']:.3f}, {o['max']:.3f}], median {o['q50']:.3f}; "
                         f"{100 * o['outside']:.3f}% of steps outside (0, 2).")
    return notes


def plot_all(res: dict, docs: Path) -> list[Path]:
    """Writes the PNGs; returns their paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs, meta = res["runs"], res["meta"]
    variants, label = list(meta["variants"]), meta["variants"]
    tasks = meta["profile"]["tasks"]
    device = meta.get("device_note") or meta["device"]["kind"]
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(docs / name, dpi=110)
        plt.close(fig)
        paths.append(docs / name)

    if "mqar" in tasks:
        agg = aggregate([r for r in runs if r["task"] == "mqar"], "accuracy")
        sets = _settings(runs, "mqar")
        pairs = sorted({s["num_pairs"] for s in sets})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
        for ax, P in zip(axes[0], pairs, strict=True):
            Ts = sorted(s["seq_len"] for s in sets if s["num_pairs"] == P)
            for i, v in enumerate(variants):
                m = [agg[(v, "mqar", _skey({"seq_len": T, "num_pairs": P}))] for T in Ts]
                # Lengths double: one slot per length, variants dodged inside it.
                x = np.arange(len(Ts)) + 0.06 * (i - (len(variants) - 1) / 2)
                ax.errorbar(x, [100 * a[0] for a in m], yerr=[100 * a[1] for a in m],
                            marker="o", capsize=3, label=label[v], color=COLORS.get(v))
            ax.set_xticks(np.arange(len(Ts)), [str(T) for T in Ts])
            ax.set_xlim(-0.5, len(Ts) - 0.5)
            ax.set_ylim(-2, 102)
            ax.set_title(f"MQAR, {P} key-value pairs")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("recall accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Recall vs sequence length (mean ± std over seeds; {device})", fontsize=10)
        save(fig, "recall_mqar_vs_length.png")

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for v in variants:
            rs = [r for r in runs if r["task"] == task and r["variant"] == v]
            by_seed: dict[int, list] = {}
            for r in rs:
                by_seed.setdefault(r["seed"], r["train_loss_curve_all_settings"])
            curves = np.array(list(by_seed.values()))
            steps = rs[0]["loss_curve"]["step"]
            mean, sd = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, label=label[v], color=COLORS.get(v))
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2, color=COLORS.get(v))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (masked positions)")
        ax.set_title(f"{task.upper()} training loss" + (" (all settings)" if task == "mqar"
                                                        else " (pass-key)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "recall_loss_curves.png")

    if "niah" in tasks:
        agg = aggregate([r for r in runs if r["task"] == "niah"], "exact_match")
        sets = _settings(runs, "niah")
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ds = [s["depth"] for s in sets]
        for i, v in enumerate(variants):
            m = [agg[(v, "niah", _skey(s))] for s in sets]
            ax.errorbar(np.array(ds) + 0.008 * (i - len(variants) / 2), [100 * a[0] for a in m],
                        yerr=[100 * a[1] for a in m], marker="o", capsize=3, label=label[v],
                        color=COLORS.get(v))
        ax.set_ylim(-2, 102)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"Pass-key retrieval, T = {sets[0]['seq_len']} bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "recall_niah_depth.png")
    return paths


def write_docs(res: dict, docs: Path, json_path: Path | None, command: str) -> Path:
    """Writes ``RESULTS.md`` and the plots into ``docs`` from a result dict; returns the path
    of ``RESULTS.md``. ``json_path`` (the file it came from) and ``command`` (the one that
    produced it) are named in the text."""
    docs.mkdir(parents=True, exist_ok=True)
    pngs = plot_all(res, docs)
    path = docs / "RESULTS.md"
    path.write_text(markdown(res, json_path, command, [p.name for p in pngs]))
    return path


def markdown(res: dict, json_path: Path | None, command: str, pngs: list[str]) -> str:
    """The text of ``RESULTS.md``; ``pngs`` are the names of the plots beside it."""
    meta, prof = res["meta"], res["meta"]["profile"]
    device = meta.get("device_note") or f"{meta['device']['kind']} ({meta['device']['platform']})"
    quick = prof["name"] != "full"
    tabs = tables(res)
    notes = observations(res)
    m0 = meta["model"][next(iter(meta["model"]))]
    params = {v: g[next(iter(g))]["params"] for v, g in meta["groups"].items()}
    L = []
    L.append("# Recall at small scale: Q-Delta against Gated DeltaNet, fixed lam and DeltaNet")
    L.append("")
    if quick:
        L.append(f"> **This is the `{prof['name']}` profile run on {device}**: a first look with a "
                 "tiny model and a few hundred steps, not the result. It is replaced by the GPU "
                 "run (`--budget-minutes 5`, profile `full`).")
        L.append("")
    L.append(f"Generated by `{PROGRAM}` "
             + (f"from `{json_path}` " if json_path else "") + f"on {meta['date']}.")
    L.append("")
    L.append("## What was run")
    L.append("")
    L.append(f"- Command: `{command}`")
    L.append(f"- Device: {device}; JAX {meta['versions'].get('jax', '?')}, Flax "
             f"{meta['versions'].get('flax', '?')}; Q-Delta op implementation "
             f"`{meta['implementation']}`; float32.")
    L.append(f"- Wall time {meta['wall_s']:.0f} s in all (budget {meta['budget_minutes']:g} min): "
             f"lowering {meta['lower_s']:.0f} s, compiling {meta['compile_s']:.0f} s "
             f"({len(meta['groups']) * len(prof['tasks']) * 3} programs in parallel threads), "
             f"training {meta['train_s']:.0f} s, evaluation {meta['eval_s']:.0f} s.")
    L.append(f"- Model (every variant): {m0['num_hidden_layers']} layers, width "
             f"{m0['hidden_size']}, {m0['num_heads']} heads of key dim {m0['head_dim']} (value dim "
             f"{int(m0['expand_v'] * m0['head_dim'])}), short conv, output gate, SwiGLU MLP, chunk "
             f"{m0['chunk_size']}; parameters: " + ", ".join(
                 f"{v} {params[v] / 1e6:.3f}M" for v in params) + " (MQAR vocabulary).")
    L.append("- Variants: " + "; ".join(f"`{v}` = {lab}" for v, lab in meta["variants"].items())
             + ". Same initial seed, data and schedule for every variant.")
    L.append(f"- Training: {meta['steps']} steps" + (
        f" (planned {meta['planned_steps']}: stopped early, the budget ran out)"
        if meta["stopped_early"] else "")
        + f", AdamW (b2 0.95, weight decay {prof['weight_decay']}, clip 1.0), peak lr "
          f"{prof['lr']:g}, {prof['warmup']} warm-up steps, cosine to 0.1x; seeds "
          f"{', '.join(str(s) for s in prof['seeds'])} (init and data), trained together "
          "(vmapped).")
    if "mqar" in prof["tasks"]:
        sets = ", ".join(f"(T {T}, P {P})" for T, P in prof["mqar_settings"])
        L.append(f"- MQAR: vocabulary {prof['mqar_vocab']}; one model per variant and seed "
                 f"trained on a mixture of the settings {sets}, {prof['mqar_rows']} rows of each "
                 f"per batch (rows padded at the end to the longest T, padding masked); evaluated "
                 f"on {prof['mqar_eval_rows']} held-out rows per setting and seed. Metric: token "
                 "accuracy on the queried values.")
    if "niah" in prof["tasks"]:
        L.append(f"- Needle in a haystack: pass-key (5 digits in repeated filler), bytes, T = "
                 f"{prof['niah_len']}, {prof['niah_rows']} rows a batch at random depths; "
                 f"evaluated at depths {', '.join(f'{d:g}' for d in prof['niah_depths'])} on "
                 f"{prof['niah_eval_rows']} held-out rows each per seed. Metric: exact match of "
                 "the answer (teacher-forced, so equal to greedy decoding of it).")
    L.append("")
    L.append("## Final recall (%), mean ± std over seeds")
    L.append("")
    for task, tab in tabs.items():
        L.append(f"**{task.upper()}** ({'recall accuracy' if task == 'mqar' else 'exact match'};"
                 " best per column in bold)")
        L.append("")
        L.append(tab)
        L.append("")
    if pngs:
        L.append("## Plots")
        L.append("")
        for name in pngs:
            L.append(f"![{name}]({name})")
            L.append("")
    else:
        L.append("(No plots: matplotlib was not importable; re-render with "
                 f"`{PROGRAM} --from-json OUT/recall.json`.)")
        L.append("")
    L.append("## Stability diagnostic of the trained Q-Delta model")
    L.append("")
    L.append("`beta_t * c_t` with `c_t = k_t . (k_t + lam_t q_t)` (docs/MATH.md section 1; a write "
             "contracts the prediction error when it lies in (0, 2)), on every real token of the "
             "evaluation rows, pooled over seeds (`qdelta_jax.diagnostics`).")
    L.append("")
    for v in ("qdelta", "qdelta-neg"):
        for task, s in res.get("diagnostics", {}).get(v, {}).items():
            L.append(f"**{meta['variants'][v]}, {task.upper()}**")
            L.append("")
            L.append(diagnostics.format_table(s, markdown=True))
            L.append("")
            lam = res.get("lam", {}).get(v, {}).get(task)
            if lam:
                L.append("Learned lam (mean [5%, 95%] per layer and head): " + "; ".join(
                    f"layer {ly['layer']} head {h['head']}: {h['mean']:.3f} "
                    f"[{h['q5']:.3f}, {h['q95']:.3f}]" for ly in lam for h in ly["heads"]) + ".")
                L.append("")
    others = [(v, t, s) for v, d in res.get("diagnostics", {}).items() if v not in
              ("qdelta", "qdelta-neg") for t, s in d.items()]
    if others:
        L.append("Other variants (share of steps outside (0, 2), max of beta*c): " + "; ".join(
            f"{v}/{t} {100 * s['overall']['outside']:.3f}% (max {s['overall']['max']:.3f})"
            for v, t, s in others) + ".")
        L.append("")
    L.append("## What the numbers say")
    L.append("")
    L.append("<!-- auto: computed from the numbers; the paragraph after the list is written by "
             "hand -->")
    for n_ in notes:
        L.append(f"- {n_}")
    L.append("")
    L.append(_READING)
    L.append("")
    return "\n".join(L)


_READING = (
    "Reading: these are tiny models (well under a million parameters outside the embeddings) "
    "trained for minutes, with one learning rate shared by every variant and three seeds; a "
    "difference smaller than the seed spread is not a result. The paper's claims are at 340M and "
    "1.3B parameters on FineWeb-Edu (docs/MATH.md section 5), and this experiment can only say "
    "whether the "
    "direction of the effect shows up on synthetic recall at this scale."
)

