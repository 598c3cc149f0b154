"""results.md: the run in the shape of BENCHMARKS.md's "GPU check" section (paste it there as is)."""

from __future__ import annotations


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def _met(fig: dict) -> str:
    return "-" if fig.get("met") is None else ("met" if fig["met"] else "**MISSED**")


def _rows_tables(rows: list[dict]) -> list[str]:
    lines: list[str] = []
    tables: dict[str, list[dict]] = {}
    for r in rows:
        tables.setdefault(r["table"], []).append(r)
    for name, table in tables.items():
        keys = list(dict.fromkeys(k for r in table for k in r if k != "table"))
        lines += ["", f"{name}:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in table]
    return lines


def render_markdown(results: dict) -> str:
    v = results["versions"]
    lines = [
        f"### {results['date']}: {results['device']}" + (" (CPU REHEARSAL)" if results["rehearsal"] else ""),
        "",
        f"- Command: `{results['command']}`, {results['total_s']:.0f} s of a {results['budget_s']:.0f} s budget.",
        "- Software: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
    ]
    if results["rehearsal"]:
        lines.append("- Rehearsal on CPU at tiny shapes, Triton under its interpreter: the figures check that every "
                     "section runs and reports; they say nothing about GPU speed, so met/missed is not a finding.")
    s = results["summary"]
    lines.append(f"- Summary: {s['figures']} figures, {s['targets_met']} targets met, {s['targets_missed']} missed; "
                 f"sections failed: {', '.join(s['sections_failed']) or 'none'}; {s['skipped_cases']} cases skipped.")
    imports = results["import_check"]
    lines.append("- Imports: " + ("only the allowed packages and what they require" if imports["ok"]
                                  else f"OUTSIDE the allowed set: {imports['foreign']}"))
    for name, section in results["sections"].items():
        lines += ["", f"#### {name}: {section['status']}, {section.get('seconds', 0):.1f} s of {section['budget_s']:.0f} s"]
        if section.get("error"):
            lines += ["", "Error: `" + _cell(section["error"])[:600] + "`"]
        for note in section.get("notes", []):
            lines += ["", f"- {note}"]
        if section.get("figures"):
            lines += ["", "| figure | value | unit | target | |", "|---|---|---|---|---|"]
            lines += [f"| {_cell(f['name'])}{' (' + _cell(f['note']) + ')' if f.get('note') else ''} | {_cell(f['value'])} | "
                      f"{_cell(f['unit'])} | {_cell(f['target'])} | {_met(f)} |" for f in section["figures"]]
        lines += _rows_tables(section.get("rows", []))
        if section.get("skipped"):
            lines += ["", "Skipped: " + "; ".join(f"{_cell(k['case'])} ({_cell(k['reason'])})" for k in section["skipped"])]
    return "\n".join(lines) + "\n"
