"""Evaluation (CA/ASR on the lab test set) on 1 rank x 1 thread against N ranks x 1 thread under torchrun
(gloo), side by side in one run: the speed-up and whether the numbers are identical. Lab CLIP (bundled
BadNet model, Fashion-MNIST test images).

    python -m bench.distributed_eval                 # 10,000 test images, 1 vs 2 ranks
    python -m bench.distributed_eval --images 500    # a quick look

Writes bench/results/distributed_eval.json and .md. Each rank runs one thread (OMP_NUM_THREADS=1), so
on this 2-core machine 2 ranks use both cores; timings cover the evaluation only (not start-up)."""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.io import atomic_path, write_json

from .common import command, machine


def worker(images):
    """Run under torchrun (or alone): evaluate, print {'seconds', 'result', 'ranks'} on rank 0."""
    import torch.distributed as dist

    from engine import distributed
    from engine.job import JobConfig, prepare
    from engine.evaluate import evaluate_attack
    job = prepare(JobConfig(attack="badnet", eval_limit=images, shots=1), log=lambda *a: None)
    if distributed.active():
        dist.barrier()
    t0 = time.perf_counter()
    res = evaluate_attack(job.clip, job.test, job.trigger, job.target, text=job.text)
    seconds = time.perf_counter() - t0
    if distributed.active():
        seconds = distributed.sum_value(seconds) / distributed.world()   # ranks finish together (the counts sum)
    if distributed.is_main():
        print("RESULT " + json.dumps({"seconds": seconds, "result": res, "ranks": distributed.world()}))


def _run(ranks, images):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "bench.distributed_eval", "--worker", "--images", str(images)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(port), "-m", "bench.distributed_eval", "--worker", "--images", str(images)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/distributed_eval", help="path prefix of .json/.md")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.images)
    one, many = _run(1, args.images), _run(args.ranks, args.images)
    speedup = one["seconds"] / many["seconds"]
    cmd = command("bench.distributed_eval", argv)
    write_json(args.out + ".json", {"command": cmd, "machine": machine(), "images": args.images,
                                    "one_rank": one, "ranks": many, "speedup": speedup,
                                    "identical": one["result"] == many["result"]})
    md = (f"| evaluation of {args.images:,} lab test images (clean + triggered) | seconds | CA | ASR |\n|---|---|---|---|\n"
          f"| 1 rank x 1 thread | {one['seconds']:.1f} | {one['result']['ca']:.2f} | {one['result']['asr']:.2f} |\n"
          f"| {args.ranks} ranks x 1 thread (torchrun, gloo) | {many['seconds']:.1f} | {many['result']['ca']:.2f} | "
          f"{many['result']['asr']:.2f} |\n\nSpeed-up {speedup:.2f}x; numbers identical: "
          f"{one['result'] == many['result']} (`{cmd}`).\n")
    with atomic_path(Path(args.out + ".md")) as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
