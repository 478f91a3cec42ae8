#!/usr/bin/env python3
"""Reads what scripts/gpu-check.sh collected in one folder and writes summary.json there,
in the form of docs/perf/<date>-<device>.json:

{"date", "device", "driver", "cublas", "tests": {"<binary>": {"passed", "failed",
 "ignored", "rc", "seconds"}}, "cases": [{"name", "ours_s", "torch_s", "ratio", "tflops",
 "gbps", ...}], "kernels": {"<kernel>": {"registers", "spill_stores", "spill_loads",
 "smem"}}, "sanitizer": [...], "demo": "...", "opt_ins": [{"case", "variant", "speedup", ...}],
 "best_vs_torch": [{"case", "run", "ours_s", "torch_s", "ratio", "peak_gib", ...}]}

`ratio` is PyTorch's time over ours (above 1: we are faster). Standard library only.
Usage: gpu-summary.py DIR
"""
import datetime
import io
import json
import os
import re
import sys
import tarfile


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def test_results(d):
    logs = {}
    tar = os.path.join(d, "test-logs.tar.gz")
    if os.path.exists(tar):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.isfile():
                    logs[m.name] = t.extractfile(m).read().decode("utf-8", "replace")
    tests = {}
    for name, text in logs.items():
        if not name.endswith(".log"):
            continue
        binary = os.path.basename(name)[:-4]
        passed = failed = ignored = 0
        for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
            passed, failed, ignored = passed + int(m[1]), failed + int(m[2]), ignored + int(m[3])
        rc, secs = (logs.get(name[:-4] + ".rc", "").split() + [None, None])[:2]
        entry = {"passed": passed, "failed": failed, "ignored": ignored,
                 "rc": int(rc) if rc is not None else None, "seconds": int(secs) if secs else None}
        entry["failures"] = re.findall(r"^test (\S+) \.\.\. FAILED$", text, re.M)
        if entry["rc"] not in (0, None) and failed == 0:
            entry["failures"].append(f"exited with {rc} (timeout is 124; a crash has no test result line)")
        tests[binary] = entry
    return tests


def kernels(d):
    out = {}
    cur = None
    for line in read(os.path.join(d, "ptxas-sm90a.txt")).splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            cur = m[1]
            out.setdefault(cur, {})
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur].update(spill_stores=int(m[1]), spill_loads=int(m[2]))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            out[cur]["registers"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            if s:
                out[cur]["smem"] = int(s[1])
    return out


def cases(d):
    # The two bench runs (bench.json, then bench-rest.json) both time the ceilings: the
    # first run's figures are kept.
    bench = {"results": []}
    for name in ("bench.json", "bench-rest.json"):
        try:
            results = json.loads(read(os.path.join(d, name)) or "{}").get("results", [])
        except json.JSONDecodeError:
            continue
        have = {r["name"] for r in bench["results"]}
        bench["results"] += [r for r in results if r["name"] not in have]
    # The opt-in runs (bench-<tag>.json: split masters, im2col by rows, the attention sets
    # in the training steps) under their tag, without their ceilings.
    for name in sorted(os.listdir(d)):
        m = re.fullmatch(r"bench-(.+)\.json", name)
        if not m or m[1] == "rest":
            continue
        try:
            results = json.loads(read(os.path.join(d, name)) or "{}").get("results", [])
        except json.JSONDecodeError:
            continue
        bench["results"] += [dict(r, name=f"{r['name']} {{{m[1]}}}") for r in results
                             if r.get("family") not in ("copy", "matmul")]
    torch = {}
    try:
        for c in json.loads(read(os.path.join(d, "torch.json")) or "{}").get("cases", []):
            s = c.get("seconds")
            if s and (c["name"] not in torch or s < torch[c["name"]]["seconds"]):
                torch[c["name"]] = c
    except json.JSONDecodeError:
        pass
    rows = []
    seen = set()
    for r in bench.get("results", []):
        # A tagged run's case (`name {tag}`) is compared with PyTorch's `name`.
        t = torch.get(r["name"]) or torch.get(base_name(r["name"]))
        ours = r.get("seconds")
        row = {"name": r["name"], "family": r.get("family"), "ours_s": ours,
               "torch_s": t["seconds"] if t else None,
               "ratio": (t["seconds"] / ours) if (t and ours) else None,
               "tflops": r.get("tflops"), "gbps": r.get("gbps"),
               "fraction_of_ceiling": r.get("fraction_of_ceiling"),
               "samples_per_s": r.get("samples_per_s"), "peak_gib": r.get("peak_gib"), "mfu": r.get("mfu"),
               "torch_variant": t.get("variant") if t else None,
               "torch_tflops": t.get("tflops") if t else None, "torch_gbps": t.get("gbps") if t else None,
               "torch_peak_gib": t.get("peak_mem_gib") if t else None,
               "torch_samples_per_s": t.get("samples_per_s") if t else None,
               "error": r.get("error")}
        rows.append(row)
        seen.add(r["name"])
    for name, t in torch.items():
        if name not in seen:
            rows.append({"name": name, "ours_s": None, "torch_s": t["seconds"], "ratio": None,
                         "tflops": None, "gbps": None, "torch_variant": t.get("variant"),
                         "torch_tflops": t.get("tflops"), "torch_gbps": t.get("gbps"),
                         "torch_peak_gib": t.get("peak_mem_gib"), "error": "not run by ours"})
    return rows


def base_name(name):
    """A case's name without the tag of the run that timed it (`name {tag}` → `name`)."""
    return re.sub(r" \{[^}]+\}$", "", name)


def same_computation(name):
    """The case a run computes, whatever way it ran: without its run's tag, its `[variant]`
    (another kernel, a CUDA graph) and `optimizer after backward` (the same update bit for
    bit, after the pass instead of inside it)."""
    name = re.sub(r"\[[^\]]+\]", "", base_name(name))
    return re.sub(r" optimizer after backward$", "", name)


def best_vs_torch(cases):
    """For each case PyTorch timed, our fastest run of the same computation: the default,
    a variant, or a tagged run (bench-<tag>.json, e.g. an attention set with the opt-ins
    that passed), with both peaks."""
    torch = {c["name"]: c for c in cases if c.get("torch_s")}
    best = {}
    for c in cases:
        base = same_computation(c["name"])
        t = torch.get(base)
        if not c.get("ours_s") or not t:
            continue
        if base not in best or c["ours_s"] < best[base]["ours_s"]:
            run = "default" if c["name"] == base else c["name"]
            best[base] = {"case": base, "run": run, "ours_s": c["ours_s"], "torch_s": t["torch_s"],
                          "ratio": t["torch_s"] / c["ours_s"], "peak_gib": c.get("peak_gib"),
                          "torch_peak_gib": t.get("torch_peak_gib"), "torch_variant": t.get("torch_variant")}
    return list(best.values())


def opt_ins(cases):
    """Each opt-in case beside its default: `op[variant] shape` against `op shape`, and
    `name {tag}` (a run with a switch set, bench-<tag>.json) against `name`, and the
    training step with the update after the backward pass against the recipe's. Speedup is the
    default's time over the opt-in's (above 1: the opt-in is faster)."""
    by_name = {c["name"]: c for c in cases}
    out = []
    for c in cases:
        # Every reading of the name as (default, variant), in this order; the first whose
        # default was run counts (`train step[graphs] … optimizer after backward` pairs
        # with `train step … optimizer after backward`, its only difference).
        pairs = []
        for pattern in (r"(.*) \{(.+)\}", r"([^\[]*)\[([^\]]+)\](.*)", r"(.*) (optimizer after backward)"):
            m = re.fullmatch(pattern, c["name"])
            if m:
                pairs.append((m[1] + (m[3] if m.re.groups == 3 else ""), m[2]))
        found = [(b, v) for b, v in pairs if b in by_name]
        if not found:
            continue
        base, variant = found[0]
        d = by_name[base]
        if not d.get("ours_s") or not c.get("ours_s"):
            continue
        out.append({"case": base, "variant": variant, "default_s": d["ours_s"], "variant_s": c["ours_s"],
                    "speedup": d["ours_s"] / c["ours_s"], "default_peak_gib": d.get("peak_gib"),
                    "variant_peak_gib": c.get("peak_gib")})
    return out


def main():
    d = sys.argv[1]
    smi = read(os.path.join(d, "nvidia-smi.txt")).splitlines()
    device, driver = "unknown", None
    if len(smi) > 1 and "," in smi[1]:
        parts = [p.strip() for p in smi[1].split(",")]
        device, driver = parts[0], parts[1]
    summary = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "driver": driver,
        "cublas": read(os.path.join(d, "cublas.txt")).strip(),
        "info": read(os.path.join(d, "info.txt")).strip(),
        "tests": test_results(d),
        "cases": cases(d),
        "kernels": kernels(d),
        "sanitizer": read(os.path.join(d, "sanitizer.txt")).strip().splitlines(),
        "demo": read(os.path.join(d, "demo.txt")).strip().splitlines()[-3:],
        "torch_source": read(os.path.join(d, "torch-source.txt")).strip() or "this run",
    }
    summary["opt_ins"] = opt_ins(summary["cases"])
    summary["best_vs_torch"] = best_vs_torch(summary["cases"])
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    t = summary["tests"]
    print(f"tests: {sum(v['passed'] for v in t.values())} passed, {sum(v['failed'] for v in t.values())} failed "
          f"in {len(t)} executables; failing: {[k for k, v in t.items() if v['failed'] or v['rc']]}")
    spills = {k: v for k, v in summary["kernels"].items() if v.get("spill_stores") or v.get("spill_loads")}
    print(f"kernels: {len(summary['kernels'])}, spilling: {sorted(spills)}")
    for c in summary["cases"]:
        if c.get("ratio"):
            mfu = f"  MFU {100 * c['mfu']:.1f}%" if c.get("mfu") else ""
            print(f"{c['name']:<44} ours {c['ours_s']*1e3:10.3f} ms  torch {c['torch_s']*1e3:10.3f} ms  "
                  f"ratio {c['ratio']:.2f}{mfu}")
    if any(b["run"] != "default" for b in summary["best_vs_torch"]):
        print("our fastest run of each case against PyTorch (ratio > 1: ours is faster):")
        for b in summary["best_vs_torch"]:
            peak = ""
            if b.get("peak_gib") and b.get("torch_peak_gib"):
                peak = f"  peak {b['peak_gib']:.2f} / {b['torch_peak_gib']:.2f} GiB"
            print(f"  {b['case']:<44} ratio {b['ratio']:.2f}{peak}  ({b['run']})")
    if summary["opt_ins"]:
        print("opt-in against default (speedup > 1: the opt-in is faster):")
    for o in summary["opt_ins"]:
        peak = ""
        if o.get("default_peak_gib") and o.get("variant_peak_gib"):
            peak = f"  peak {o['default_peak_gib']:.2f} -> {o['variant_peak_gib']:.2f} GiB"
        print(f"  {o['case']:<44} [{o['variant']}] {o['default_s']*1e3:10.3f} -> {o['variant_s']*1e3:10.3f} ms  "
              f"speedup {o['speedup']:.2f}{peak}")


if __name__ == "__main__":
    main()
