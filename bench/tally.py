#!/usr/bin/env python3
"""Tallies every interleaved run under bench/results/interleaved (or the directories given):
for each HTTP scenario that ran the `floor` subject (keep-alive, LB at 1 rule), the medians of
trellis, HAProxy and the floor, uncapped and capped, and how often each target was reachable.

    python3 bench/tally.py [DIR ...]

The floor relays bytes and does no proxy work; its rate is the most any proxy in the subject's
seat reached in that run (see bench/README "The ceiling"). A run whose floor is below 1.2×
HAProxy is one where no proxy could meet the 1.2× target.
"""
import glob
import json
import os
import statistics as st
import sys

TARGET = 1.2


def median(runs, key="rate"):
    return st.median(r[key] for r in runs)


def load(path):
    """A run's scenarios by name, or None (said on stderr) when its results.json is unreadable."""
    try:
        with open(path) as f:
            return {s["name"]: s for s in json.load(f)}
    except (OSError, ValueError) as e:
        print(f"skipped {path}: {e}", file=sys.stderr)
        return None


def rows_of(run, scenarios):
    for name, s in scenarios.items():
        subj = {r["subject"]: r["runs"] for r in s["rows"]}
        if name.endswith("-capped") or not {"trellis", "haproxy", "floor"} <= subj.keys():
            continue
        if not all(subj[k] for k in ("trellis", "haproxy", "floor")):
            continue
        t, h, fl = (median(subj[k]) for k in ("trellis", "haproxy", "floor"))
        capped = None
        cap = scenarios.get(f"{name}-capped") or scenarios.get(
            name.rsplit("-", 1)[0] + "-capped"
        )
        if cap:
            cs = {r["subject"]: r["runs"] for r in cap["rows"]}
            if cs.get("trellis") and cs.get("haproxy"):
                capped = median(cs["trellis"]) / median(cs["haproxy"])
        yield {
            "run": run,
            "scenario": name,
            "trellis_vs_haproxy": t / h,
            "floor_vs_haproxy": fl / h,
            "trellis_vs_floor": t / fl,
            "p99_trellis": median(subj["trellis"], "p99_us"),
            "p99_haproxy": median(subj["haproxy"], "p99_us"),
            "capped": capped,
        }


def flatness(scenarios):
    """trellis' rate at 1,000 LB rules ÷ at 1 rule, for a run that measured both."""
    rates = []
    for name in ("lb-rules-1", "lb-rules-1000"):
        rows = {r["subject"]: r["runs"] for r in scenarios.get(name, {}).get("rows", [])}
        if not rows.get("trellis"):
            return
        rates.append(median(rows["trellis"]))
    yield rates[1] / rates[0]


def main():
    dirs = sys.argv[1:] or sorted(glob.glob("bench/results/interleaved/*"))
    runs = [(os.path.basename(d), load(os.path.join(d, "results.json"))) for d in dirs]
    runs = [(run, scenarios) for run, scenarios in runs if scenarios is not None]
    rows = [r for run, scenarios in runs for r in rows_of(run, scenarios)]
    if not rows:
        print("no interleaved run with a floor subject found")
        return 1
    print("| run | scenario | trellis ÷ HAProxy | floor ÷ HAProxy | trellis ÷ floor "
          "| p99 trellis / HAProxy (µs) | capped: trellis ÷ HAProxy |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        capped = "–" if r["capped"] is None else f"{r['capped']:.2f}×"
        print(f"| {r['run']} | {r['scenario']} | {r['trellis_vs_haproxy']:.2f}× "
              f"| {r['floor_vs_haproxy']:.2f}× | {r['trellis_vs_floor']:.2f} "
              f"| {r['p99_trellis']:,.0f} / {r['p99_haproxy']:,.0f} | {capped} |")
    n = len(rows)
    capped = [r["capped"] for r in rows if r["capped"] is not None]
    floor_ok = sum(r["floor_vs_haproxy"] >= TARGET for r in rows)
    met = sum(r["trellis_vs_haproxy"] >= TARGET for r in rows)
    met_p99 = sum(r["trellis_vs_haproxy"] >= TARGET and r["p99_trellis"] <= r["p99_haproxy"]
                  for r in rows)
    print()
    print(f"- {n} runs. The floor reached {TARGET}× HAProxy in {floor_ok} "
          f"(median {st.median(r['floor_vs_haproxy'] for r in rows):.2f}×, "
          f"{min(r['floor_vs_haproxy'] for r in rows):.2f}–"
          f"{max(r['floor_vs_haproxy'] for r in rows):.2f}×): in the other {n - floor_ok} "
          f"no proxy could.")
    print(f"- trellis reached {TARGET}× HAProxy in {met} ({met_p99} with p99 ≤ HAProxy's); "
          f"median {st.median(r['trellis_vs_haproxy'] for r in rows):.2f}×, at a median "
          f"{st.median(r['trellis_vs_floor'] for r in rows):.2f} of the floor; p99 ≤ HAProxy's "
          f"in {sum(r['p99_trellis'] <= r['p99_haproxy'] for r in rows)}.")
    flat = [f for _, scenarios in runs for f in flatness(scenarios)]
    if flat:
        print(f"- LB, trellis at 1,000 rules ÷ at 1 rule: ≥ 0.9 in "
              f"{sum(f >= 0.9 for f in flat)} of {len(flat)} runs (median "
              f"{st.median(flat):.2f}, {min(flat):.2f}–{max(flat):.2f}).")
    if capped:
        print(f"- Capped at the same CPU: trellis ≥ {TARGET}× HAProxy in "
              f"{sum(c >= TARGET for c in capped)} of {len(capped)} "
              f"(median {st.median(capped):.2f}×, {min(capped):.2f}–{max(capped):.2f}×).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
