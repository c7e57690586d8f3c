"""Perturbation resistivity (docs/ALGORITHMS.md, "Perturbation resistivity") of the bundled lab CLIPs,
and of the BadNet model after the repair defense: per layer, the mean cosine between class tokens of x and of a perturbed x.
Lab CLIP numbers (Fashion-MNIST), not real CLIP.

    python -m bench.resistivity            # clean, badnet, badnet repaired; 1,000 test images
    python -m bench.resistivity --quick    # CI smoke: 50 images, 2 repair epochs

Shows whether the lab models have the RVPT paper's premise (a backdoored model's class tokens resist
perturbations more than a clean model's). Writes bench/results/resistivity.json and .md."""
import argparse
import time

from engine import data as D
from engine import diagnostics
from engine.job import JobConfig, prepare
from engine.defenses import repair
from engine.models import bundled_checkpoint, load_model
from engine.triggers import make_trigger

from .common import command, machine, write_results


def rows_of(name, pr):
    return [{"model": name, "perturbation": k, "per_layer": [round(v, 4) for v in vals]} for k, vals in pr.items()]


def markdown(rows, cmd):
    layers = len(rows[0]["per_layer"])
    lines = ["| model | perturbation | " + " | ".join(f"block {i + 1}" for i in range(layers)) + " |",
             "|---" * (layers + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['perturbation']} | " + " | ".join(f"{v:.3f}" for v in r["per_layer"]) + " |")
    lines += ["", f"Mean cosine of the class token between x and perturbed x (`{cmd}`)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="test images")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results/resistivity", help="path prefix of .json/.md")
    args = p.parse_args(argv)
    t0 = time.time()
    n = 50 if args.quick else args.images
    test = D.load_fashion_mnist("test", limit=n)
    trigger = make_trigger("badnet", D.LAB_SIZE)
    rows = []
    for name in ("clean", "badnet"):
        clip = load_model("lab-vit", checkpoint=bundled_checkpoint(name))
        rows += rows_of(name, diagnostics.resistivity(clip, test.images, diagnostics.perturbations(trigger)))
    job = prepare(JobConfig(attack="badnet", fused=True), log=lambda *a: None)
    cfg = repair.RepairConfig(epochs=2) if args.quick else repair.RepairConfig()
    res = repair.tune(job.clip, job.train, job.text, cfg, progress=False)
    if res["prompts"] is not None:
        pr = diagnostics.resistivity(job.clip, test.images, diagnostics.perturbations(trigger), prompts=res["prompts"])
        rows += rows_of("badnet, repaired", pr)
    cmd = command("bench.resistivity", argv)
    write_results(args.out, {"command": cmd, "machine": machine(), "images": n, "quick": args.quick,
                             "seconds": round(time.time() - t0, 1), "rows": rows}, markdown(rows, cmd))


if __name__ == "__main__":
    main()
