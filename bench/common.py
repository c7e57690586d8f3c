"""Helpers shared by the benchmark scripts: timing, machine description, result files."""
import os
import platform
import sys
import statistics
import time

import torch


def cpu_model():
    """(model name, the low-precision matrix flags it has): what a bf16 or int8 ratio depends on."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return name, sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx512f"))


def machine():
    name, flags = cpu_model()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": name, "cpu_flags": flags,
            "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns, reps, warmup=1, device=torch.device("cpu")):
    """Median seconds of each callable, timed round-robin so that machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, times


def latency_stats(seconds, batch):
    """p50/p95 latency (ms) and throughput (images/s, from the median) of one callable's timings."""
    ms = sorted(1000.0 * t for t in seconds)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]  # nearest rank
    p50 = statistics.median(ms)
    return {"p50_ms": p50, "p95_ms": p95, "images_per_s": 1000.0 * batch / p50, "reps": len(ms)}


def write_results(out, payload, md):
    """`out`.json (payload) and `out`.md (md), each written whole or not at all; md printed."""
    from pathlib import Path

    from engine.io import atomic_path, write_json
    write_json(str(out) + ".json", payload)
    with atomic_path(Path(str(out) + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


def command(module, argv):
    """The command line that reproduces a benchmark run."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def bundled_attacks():
    """Backdoored lab models that ship in checkpoints/lab (the manifest also lists unbundled ones)."""
    from engine import manifest
    return [name for name, entry in manifest.models().items() if name != "clean" and manifest.bundled(entry)]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install -e '.[plot]')")
        return None
    return plt


def save_figure(fig, path):
    """Write a matplotlib figure as PNG atomically and close it."""
    from engine.io import atomic_path
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
