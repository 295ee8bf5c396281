"""What a stage found, in words and one small table, built from the stage's JSON.

Each report opens with this block (notebooks 01-05 end with a cell tagged `findings` that
shows it; the HTML export moves that cell to the top), and the report index reuses the same
sentences. One function per stage turns its JSON document into a `Findings`:

    detection(detection_json)          01: verdicts, with each weight's effect and control
    individual(individual_summary)     02: each weight zeroed alone, significant changes only
    combined(combined_analysis)        03: all zeroed together
    moe(moe_analysis)                  04: super experts and expert super weights
    comparison(comparison_summary)     05: one row per model
    failed(stage, error)               a stage that stopped before its findings

Numbers come with their 95% intervals; an accuracy change is named only when its exact test
is significant (the JSON's `significant`), otherwise the block says nothing reached
significance and at what n. Pure Python on JSON dicts (no torch), so the index can use it.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MAX_ROWS = 12  # a findings table lists at most this many rows, then "... and k more"


@dataclass
class Findings:
    title: str
    sentences: list[str]
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    status: str = "ok"  # ok | empty (nothing found: said plainly) | failed

    def to_dict(self) -> dict:
        return {"title": self.title, "sentences": self.sentences, "columns": self.columns,
                "rows": self.rows, "status": self.status}


# --- numbers in words --------------------------------------------------------------------------


def number(value: float | None, digits: int = 3) -> str:
    """`value` to `digits` significant digits; None -> "n/a", inf -> "∞"."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}g}"


def ratio(value: float | None) -> str:
    """A ratio: 3 significant digits, 4 decimals within 1% of 1 (so 1.0017 is not "1")."""
    if isinstance(value, (int, float)) and value != 1 and abs(value - 1) < 0.01:
        return f"{value:.4f}"
    return number(value)


def ratio_with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """`6.79 [5.76, 8.19]`."""
    text = ratio(value)
    if interval and None not in interval:
        text += f" [{ratio(interval[0])}, {ratio(interval[1])}]"
    return text


def change_with_interval(change: float, interval: Sequence[float] | None) -> str:
    text = f"{change:+.3f}"
    if interval:
        text += f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return text


def p_value(p: float | None) -> str:
    return "n/a" if p is None else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def weight_label(w: dict) -> str:
    """`L{layer} [{row}, {column}]` (`E{expert}` / `shared` for expert weights): the same
    label as sw_lib.ablate.weight_label, without importing torch."""
    where = f"L{w.get('layer')}"
    if w.get("shared"):
        where += " shared"
    elif w.get("expert") is not None:
        where += f" E{w.get('expert')}"
    return f"{where} [{w.get('row')}, {w.get('column')}]"


def model_name(doc: dict, default: str = "the model") -> str:
    """The model as a reader knows it: an alias or hub id as given, a path by its last part."""
    name = str(doc.get("model") or default)
    return name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", ".", "~")) else name


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def layer_span(layers: Iterable[int]) -> str:
    """`layer 4`, `layers 27-29` or `layers 2, 9, 11`."""
    found = sorted(set(layers))
    if len(found) == 1:
        return f"layer {found[0]}"
    if found == list(range(found[0], found[-1] + 1)):
        return f"layers {found[0]}-{found[-1]}"
    return "layers " + ", ".join(map(str, found))


def _capped(rows: list[list[str]], columns: int) -> list[list[str]]:
    if len(rows) <= MAX_ROWS:
        return rows
    rest = len(rows) - (MAX_ROWS - 1)
    return rows[:MAX_ROWS - 1] + [[f"... and {rest} more"] + [""] * (columns - 1)]


# --- 01 detection ------------------------------------------------------------------------------


def _no_candidate_sentence(doc: dict) -> str:
    """Why nothing was found: the largest input and output spikes against the threshold."""
    threshold = (doc.get("config") or {}).get("spike_threshold")
    threshold = f"{threshold:g}" if isinstance(threshold, (int, float)) else "(not recorded)"
    layers = doc["iterations"][0]["layers"] if doc.get("iterations") else []
    if not layers:
        return "No candidate: the detection read no layer."
    top_in = max(layers, key=lambda m: m["max_input"])
    top_out = max(layers, key=lambda m: m["max_output"])
    return (f"No super weight candidate: no layer's down projection has both its input and its "
            f"output above the spike threshold {threshold} (largest input "
            f"{number(top_in['max_input'])} at layer {top_in['layer']}, largest output "
            f"{number(top_out['max_output'])} at layer {top_out['layer']}, over "
            f"{plural(len(layers), 'layer')}).")


def _candidate_row(c: dict) -> list[str]:
    control = c.get("control") or {}
    control_ratio = (ratio(control.get("max_perplexity_ratio"))
                     if control.get("measured", True) and control.get("max_perplexity_ratio")
                     else "not needed")
    after_norm = " after the post-MLP norm" if c.get("flagged_by") == ["post_norm"] else ""
    return [weight_label(c), c.get("verdict") or "no verdict",
            ratio_with_interval(c.get("perplexity_ratio"), c.get("perplexity_ratio_interval")),
            control_ratio,
            f"{number(c.get('input_value'))} → {number(c.get('output_value'))}{after_norm} "
            f"({c.get('token_text', '')!r})"]


def detection(doc: dict) -> Findings:
    """01: how many candidates got each verdict, the super weights and contributors with
    their effect zeroed alone and their control, and plainly when there is none."""
    model = model_name(doc)
    title = f"Detection: {model}"
    columns = ["weight", "verdict", "reference perplexity ratio, zeroed alone [95% CI]",
               "control's largest ratio", "input → output spike (token)"]
    candidates = doc.get("candidates", doc.get("super_weights")) or []
    if not candidates:
        return Findings(title, [_no_candidate_sentence(doc),
                                f"{model} has no super weight by this detector."],
                        status="empty")
    if doc.get("verdict_rule") is None:
        sentences = [f"{plural(len(candidates), 'candidate')} found in "
                     f"{layer_span(c['layer'] for c in candidates)}; the causal test was off "
                     "(confirm: false), so every candidate counts as a super weight, as the "
                     "original script did."]
        return Findings(title, sentences, columns,
                        _capped([_candidate_row(c) for c in candidates], len(columns)))
    by = {v: [c for c in candidates if c.get("verdict") == v]
          for v in ("super_weight", "contributor", "no_effect")}
    sentences = [f"{plural(len(candidates), 'spike candidate')}: "
                 f"{plural(len(by['super_weight']), 'super weight')}, "
                 f"{plural(len(by['contributor']), 'contributor')}, "
                 f"{len(by['no_effect'])} with no effect beyond the control."]
    for c in by["super_weight"]:
        effect = ratio_with_interval(c["perplexity_ratio"], c["perplexity_ratio_interval"])
        control = ratio((c.get("control") or {}).get("max_perplexity_ratio"))
        sentences.append(f"Super weight {weight_label(c)}: zeroing it alone multiplies the "
                         f"reference perplexity by {effect}; the control's largest change is {control}.")
    if not by["super_weight"]:
        sentences.append(f"No super weight: no candidate's effect is both catastrophic (ratio "
                         f">= {doc['verdict_rule']['super_ratio']:g}) and far outside its control.")
    if by["contributor"]:
        sentences.append("Contributors (clearly above the control, not catastrophic): "
                         + ", ".join(f"{weight_label(c)} × {ratio(c['perplexity_ratio'])}"
                                     for c in by["contributor"]) + ".")
    if by["no_effect"]:
        sentences.append(f"{plural(len(by['no_effect']), 'spike')} in "
                         f"{layer_span(c['layer'] for c in by['no_effect'])} change nothing an "
                         "ordinary weight does not.")
    shown = by["super_weight"] + by["contributor"]
    rows = [_candidate_row(c) for c in shown]
    if by["no_effect"]:
        ratios = [c["perplexity_ratio"] for c in by["no_effect"] if c.get("perplexity_ratio")]
        spread = f"{ratio(min(ratios))} to {ratio(max(ratios))}" if ratios else "n/a"
        rows.append([f"{len(by['no_effect'])} others ({layer_span(c['layer'] for c in by['no_effect'])})",
                     "no_effect", spread, "", ""])
    return Findings(title, sentences, columns, _capped(rows, len(columns)),
                    status="ok" if by["super_weight"] else "empty")


# --- accuracy changes, from either JSON shape ---------------------------------------------------


def accuracy_changes(accuracy: dict) -> list[dict]:
    """Every (task, metric) change as {task, metric, primary, baseline, modified, change,
    ci95, p_value, significant, severity, n}, from a summary's `accuracy` (02) or an
    analysis's `accuracy_impacts` (03)."""
    out = []
    for task, t in (accuracy or {}).items():
        primary = t.get("primary_metric")
        n = t.get("n", t.get("n_samples"))
        for metric, m in (t.get("metrics") or {}).items():
            if "paired_difference" in m:  # an impact (sw-combined/2)
                d = m["paired_difference"]
                entry = {"baseline": m["baseline"]["value"], "modified": m["modified"]["value"],
                         "change": d["mean"], "ci95": d.get("ci95"), "p_value": d.get("p_value"),
                         "significant": d.get("significant"), "severity": m.get("impact_severity")}
            else:  # a summary (sw-individual/2)
                entry = {"baseline": m["baseline"], "modified": m["modified"],
                         "change": m["change"], "ci95": m.get("ci95"),
                         "p_value": m.get("p_value"), "significant": m.get("significant"),
                         "severity": m.get("impact_severity")}
            out.append({"task": task, "metric": metric, "primary": metric == primary, "n": n,
                        **entry})
    return out


def significant_changes(accuracy: dict) -> list[dict]:
    return [c for c in accuracy_changes(accuracy) if c["significant"]]


def change_phrase(c: dict) -> str:
    """`hellaswag acc_norm 0.450 → 0.300, -0.150 [-0.28, -0.03], p = 0.012 (moderate)`."""
    return (f"{c['task']} {c['metric']} {c['baseline']:.3f} → {c['modified']:.3f}, "
            f"{change_with_interval(c['change'], c['ci95'])}, {p_value(c['p_value'])}"
            + (f" ({c['severity']})" if c.get("severity") else ""))


def _accuracy_sentence(accuracy: dict, who: str) -> str:
    changes = accuracy_changes(accuracy)
    if not changes:
        return f"{who}: no accuracy task was evaluated."
    significant = [c for c in changes if c["significant"]]
    if significant:
        return f"{who}, significant accuracy changes: " + "; ".join(map(change_phrase, significant)) + "."
    sizes = sorted({c["n"] for c in changes if c["n"] is not None})
    at = f" at n = {', '.join(map(str, sizes))} items per task" if sizes else ""
    return (f"{who}: no accuracy change is significant (exact McNemar test, p < 0.05){at}; "
            "no change is named from a point estimate alone.")


def perplexity_phrase(value, interval, significant, severity, finite=True) -> str:
    """`× 10.4 [9.1, 11.8], catastrophic` (or `..., not significant`)."""
    if finite is False:
        return "no longer finite: the model is destroyed"
    text = f"× {ratio_with_interval(value, interval)}"
    if significant is None:
        return text
    return text + (f", {severity}" if significant and severity else ", not significant")


def _baseline_sentence(baseline: dict | None) -> str | None:
    if not baseline:
        return None
    parts = []
    if baseline.get("perplexity") is not None:
        parts.append(f"WikiText-2 perplexity {number(baseline['perplexity'])}")
    for task, value in (baseline.get("accuracy") or {}).items():
        metric = (baseline.get("primary_metric") or {}).get(task)
        parts.append(f"{task} {value:.3f}" + (f" ({metric})" if metric else ""))
    return "Unchanged model: " + ", ".join(parts) + "." if parts else None


# --- 02 individual ablation ----------------------------------------------------------------------


def individual(summary: dict) -> Findings:
    """02: each ablated weight (or group) alone: perplexity ratio and significant changes."""
    title = f"Each super weight zeroed alone: {model_name(summary)}"
    analyses = summary.get("analyses") or []
    if not analyses:
        return Findings(title, ["Nothing was ablated: the detection gave no weight the verdict "
                                "super_weight (contributors are ablated with "
                                "--include-contributors)."], status="empty")
    sentences = [s for s in [_baseline_sentence(summary.get("baseline"))] if s]
    columns = ["zeroed alone", "perplexity ratio [95% CI]", "verdict", "significant accuracy changes"]
    rows = []
    for a in analyses:
        ppl = perplexity_phrase(a.get("perplexity_ratio"), a.get("perplexity_ratio_ci95"),
                                a.get("perplexity_significant"), a.get("perplexity_severity"),
                                a.get("modified_perplexity_finite"))
        sentences.append(f"{a['label']} zeroed alone: perplexity {ppl}.")
        sentences.append(_accuracy_sentence(a.get("accuracy"), a["label"]))
        sig = significant_changes(a.get("accuracy"))
        rows.append([a["label"],
                     "∞" if a.get("modified_perplexity_finite") is False else
                     ratio_with_interval(a.get("perplexity_ratio"), a.get("perplexity_ratio_ci95")),
                     a.get("perplexity_severity") or "",
                     "; ".join(f"{c['task']} {c['metric']} {c['change']:+.3f}" for c in sig) or "none"])
    return Findings(title, sentences, columns, _capped(rows, len(columns)))


# --- 03 combined ablation ------------------------------------------------------------------------


def _impact_row(label: str, impact: dict, accuracy: dict) -> list[str]:
    p = impact or {}
    sig = significant_changes(accuracy)
    return [label,
            "∞" if p.get("modified_perplexity_finite") is False else
            ratio_with_interval(p.get("perplexity_ratio"), p.get("ratio_ci95")),
            p.get("impact_severity") or "",
            "; ".join(f"{c['task']} {c['metric']} {c['change']:+.3f}" for c in sig) or "none"]


def combined(doc: dict) -> Findings:
    """03: all super weights zeroed together, against each alone."""
    title = f"All super weights zeroed together: {model_name(doc)}"
    weights = doc.get("super_weights") or []
    if not weights:
        return Findings(title, ["Nothing was ablated: the detection gave no weight the verdict "
                                "super_weight, so there is no combined condition."],
                        status="empty")
    p = doc.get("perplexity_impact") or {}
    who = (f"{'All ' if len(weights) > 1 else ''}{plural(len(weights), 'weight')} zeroed "
           f"({', '.join(map(weight_label, weights[:6]))}{', ...' if len(weights) > 6 else ''})")
    sentences = [s for s in [_baseline_sentence(doc.get("baseline"))] if s]
    if p:
        before, after = p.get("baseline_perplexity"), p.get("modified_perplexity")
        moved = (f"{number(before)} → {number(after) if after is not None else '∞'} "
                 if before is not None else "")
        sentences.append(f"{who}: perplexity {moved}("
                         + perplexity_phrase(p.get("perplexity_ratio"), p.get("ratio_ci95"),
                                             p.get("significant"), p.get("impact_severity"),
                                             p.get("modified_perplexity_finite")) + ").")
    else:
        sentences.append(f"{who}: perplexity was not evaluated.")
    sentences.append(_accuracy_sentence(doc.get("accuracy_impacts"), "All together"))
    if doc.get("reused"):
        sentences.append("All together is the same condition as the one weight alone "
                         "(evaluated once).")
    columns = ["condition", "perplexity ratio [95% CI]", "verdict", "significant accuracy changes"]
    rows = [_impact_row(u["label"], u.get("perplexity_impact"), u.get("accuracy_impacts"))
            for u in doc.get("individual") or []]
    rows.append(_impact_row("all together", p, doc.get("accuracy_impacts")))
    return Findings(title, sentences, columns, _capped(rows, len(columns)))


# --- 04 MoE --------------------------------------------------------------------------------------


def _expert(e: dict) -> str:
    return f"L{e['layer']} " + ("shared" if e.get("shared") else f"E{e['expert']}")


def _judged(e: dict) -> str:
    """`super_weight, × 6.79 [5.76, 8.19]` from a verdict record; `not judged` without one."""
    if not e.get("verdict"):
        return "not judged"
    return (f"{e['verdict']}, × "
            + ratio_with_interval(e.get("perplexity_ratio"), e.get("perplexity_ratio_interval")))


def moe(doc: dict) -> Findings:
    """04 (schema sw-moe/2): the super experts with their verdicts and what skipping them does
    against frequency-matched controls; the expert super weights with theirs."""
    title = f"Mixture of experts: {model_name(doc)}"
    if not doc.get("is_moe"):
        return Findings(title, [f"{model_name(doc, 'The model')} has no mixture-of-experts "
                                "layers: nothing to route."], status="empty")
    flagged = (doc.get("super_experts") or {}).get("flagged") or []
    found = doc.get("expert_super_weights") or []
    sentences = [f"{len(doc.get('moe_layers') or [])} MoE layers of {doc.get('num_experts')} "
                 f"experts (top-{doc.get('top_k')}).",
                 (f"{plural(len(flagged), 'super expert')} by the reference rule: "
                  + "; ".join(f"{_expert(e)} ({_judged(e)})" for e in flagged) + "."
                  if flagged else "No super expert is flagged by the reference rule.")]
    if flagged:
        sentences.append(skip_sentence(doc))
    sentences.append(f"{plural(len(found), 'expert super weight')}: "
                     + "; ".join(f"{weight_label(w)} ({_judged(w)})" for w in found[:8])
                     + ("..." if len(found) > 8 else "") + "."
                     if found else "No expert super weight at this spike threshold.")
    columns = ["expert", "max |down_proj output|", "p_active", "verdict",
               "reference perplexity ratio, skipped alone [95% CI]", "control's largest ratio"]
    rows = [[_expert(e), number(e.get("max_output")), number(e.get("p_active")),
             e.get("verdict") or "not judged",
             ratio_with_interval(e.get("perplexity_ratio"), e.get("perplexity_ratio_interval")),
             ratio((e.get("control") or {}).get("max_perplexity_ratio"))] for e in flagged]
    return Findings(title, sentences, columns if rows else [], _capped(rows, len(columns)))


def skip_sentence(doc: dict) -> str:
    """What skipping the super experts did to WikiText-2 perplexity, beside the controls."""
    skipping = doc.get("skip_evaluation") or {}
    impact = (skipping.get("super_experts") or {}).get("perplexity_impact")
    if not impact:
        return "Skipping them was not evaluated on WikiText-2 (evaluation off)."
    text = ("Skipping them all: WikiText-2 perplexity × "
            + (ratio_with_interval(impact.get("perplexity_ratio"), impact.get("ratio_ci95"))
               if impact.get("modified_perplexity_finite", True) else "∞")
            + f" ({impact.get('impact_severity')})")
    controls = [c.get("perplexity_impact") for c in skipping.get("controls") or []]
    controls = [c for c in controls if c]
    if controls:
        worst = max(float("inf") if not c.get("modified_perplexity_finite", True)
                    else c.get("perplexity_ratio") or 1.0 for c in controls)
        text += (f"; {plural(len(controls), 'frequency-matched control set')}: at most × "
                 f"{ratio(worst)}")
    return text + "."


# --- 05 comparison -------------------------------------------------------------------------------


def comparison(summary: dict) -> Findings:
    """05: per model its family, super weights, and what zeroing them all does."""
    models = summary.get("models") or []
    title = f"Cross-model comparison ({plural(len(models), 'model')})"
    if not models:
        return Findings(title, ["No model of this run has results to compare."], status="empty")
    columns = ["model", "family", "super weights", "perplexity ratio, all zeroed [95% CI]",
               "accuracy drops (significant)"]
    rows, sentences = [], []
    for m in models:
        weights = m.get("super_weights") or []
        if not m.get("detection_ok", True):
            shown = "n/a (detection failed)"
        elif m.get("perplexity_destroyed"):
            shown = "∞ (destroyed)"
        else:
            shown = ratio_with_interval(m.get("perplexity_ratio"), m.get("perplexity_ratio_ci95"))
        drops = [f"{task} {drop:+.3f}" for task, drop in (m.get("accuracy_drops") or {}).items()
                 if drop is not None and (m.get("accuracy_significant") or {}).get(task)]
        rows.append([m["slug"], m.get("family") or "", ", ".join(map(weight_label, weights[:4]))
                     + (" ..." if len(weights) > 4 else "") if weights else "none",
                     shown if weights else "", "; ".join(drops) or "none"])
        if not m.get("detection_ok", True):
            sentences.append(f"{m['slug']}: detection did not succeed ({m.get('status')}).")
        elif not weights:
            sentences.append(f"{m['slug']} ({m.get('family')}): no super weight found.")
        else:
            sentences.append(f"{m['slug']} ({m.get('family')}): "
                             f"{plural(len(weights), 'super weight')} in "
                             f"{layer_span(w['layer'] for w in weights)}; zeroing "
                             f"{'them' if len(weights) > 1 else 'it'}: perplexity × {shown}.")
    return Findings(title, sentences, columns, _capped(rows, len(columns)))


def failed(stage: str, error: str | None) -> Findings:
    return Findings(f"{stage} did not finish", [f"This stage failed: {error or 'unknown error'}",
                                                 "The cells below show how far it got."],
                    status="failed")


# --- rendering -----------------------------------------------------------------------------------

CSS_CLASS = "sw-findings"


def to_html(f: Findings) -> str:
    """A self-contained block (inline style, so it reads the same in JupyterLab and in the
    exported report)."""
    border = {"ok": "#2b6cb0", "empty": "#718096", "failed": "#c53030"}[f.status]
    parts = [f'<div class="{CSS_CLASS} {CSS_CLASS}-{f.status}" style="border-left:4px solid '
             f'{border};padding:.6em 1em;margin:.5em 0 1em 0;background:#f7fafc">',
             f'<h2 style="margin-top:.2em">Findings &middot; {html.escape(f.title)}</h2>',
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in f.sentences) + "</ul>"]
    if f.rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in f.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                       for row in f.rows)
        parts.append(f'<table class="{CSS_CLASS}-table"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table>")
    parts.append("</div>")
    return "".join(parts)


def to_text(f: Findings) -> str:
    lines = [f"Findings: {f.title}", *(f"- {s}" for s in f.sentences)]
    if f.rows:
        lines.append(" | ".join(f.columns))
        lines += [" | ".join(map(str, row)) for row in f.rows]
    return "\n".join(lines)


def show(f: Findings) -> None:
    """Display the block in a notebook (HTML, with plain text for text-only viewers)."""
    from IPython.display import display

    display({"text/html": to_html(f), "text/plain": to_text(f)}, raw=True)
