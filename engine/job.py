"""One tuning job as a library: which model, data, shots and trigger (JobConfig), loaded once into a Job,
and a defense run on it (defend). engine.tune parses its flags into a JobConfig; the benches build one.

    job = prepare(JobConfig(attack="blended", shots=16))
    tuned = defend(job, "repair")             # engine.purify's registry; tuned.after = CA/ASR/PA on job.test
"""
from dataclasses import dataclass, fields

import torch

from . import data as D
from . import distributed, purify
from . import precision as P
from .evaluate import evaluate_attack
from .errors import UserError
from .models import bundled_checkpoint, is_lab, load_model
from .triggers import make_trigger
from .triggers.spec import spec_trigger


@dataclass
class JobConfig:
    model: str = "lab-vit"            # lab-vit or an open_clip architecture
    pretrained: str = None            # open_clip pretrained tag
    checkpoint: str = None            # local checkpoint; lab-vit without one: the bundled model of `attack`
    dataset: str = "fashion-mnist"    # fashion-mnist, folder:PATH or csv:PATH
    data_dir: str = None
    attack: str = "badnet"            # trigger ASR is measured with (engine.triggers.TRIGGERS)
    target: str = "bag"               # class name or index
    trigger_seed: int = 0
    trigger_spec: str = None          # JSON spec or @FILE (engine/triggers/spec.py): replaces `attack`'s trigger
    shots: int = 16                   # clean labelled images per class
    unlabelled: int = 0               # extra clean train images without labels (the repair distils on them too)
    eval_limit: int = None            # test images (None: all)
    seed: int = 0
    device: str = "auto"
    fused: bool = False               # fastest prompted-ViT path here (Triton on CUDA, shared on CPU)
    backend: str = None               # force one engine.prompted_vit backend
    precision: str = "fp32"           # engine.precision: fp32, bf16, fp16 or auto (bf16 where native)

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def pick_backend(fused, backend, device):
    """--fused means the fastest path that exists here: Triton kernels on CUDA, `shared` torch on CPU."""
    if backend:
        if backend == "triton" and device.type != "cuda":
            raise UserError("--backend triton needs a CUDA device (Triton kernels); use shared on the CPU")
        return backend, f"{backend} (chosen with --backend)"
    if fused and device.type == "cuda":
        from kernels import triton_available
        if triton_available():
            return "triton", "triton (fused Triton kernels on CUDA)"
        return "shared", "shared (torch prompt-aware path: triton is not importable)"
    if fused:
        return "shared", "shared (torch prompt-aware path; the Triton kernels need CUDA, so --fused is the shared path on the CPU)"
    return "naive", "naive (torch.cat reference; pass --fused for the fast path)"


def resolve_device(name):
    """--device: auto, cpu, cuda or cuda:N -> torch.device; a UserError for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:  # "Invalid device string"
        raise UserError(f"--device {name} is not a device: use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu, cuda, cuda:N or auto are supported")
    return device


def resolve_target(target, classes):
    if target.isdigit() and int(target) < len(classes):
        return int(target)
    if target not in classes:
        raise UserError(f"target class '{target}' is not in the class list {classes}")
    return classes.index(target)


@dataclass
class Job:
    """Everything a defense needs, loaded once (engine.tune, the benches and the scan reuse it)."""
    clip: object
    train: object             # the few-shot ImageSet
    test: object
    trigger: object
    target: int
    text: torch.Tensor        # hand-written zero-shot classifier (K, E) from `templates`
    templates: list
    backend: str
    checkpoint: object
    model: str = "lab-vit"   # the architecture name (selects each defense's lab or paper defaults)
    tune_precision: str = "fp32"   # engine.precision, resolved for the device: tuning ...
    eval_precision: str = "fp32"   # ... and evaluation (the same from --precision; bench.precision varies this one)
    detection: object = None  # engine.inversion.detect's result on `train`, when already computed (bench.zoo)
    unlabelled: object = None  # (N, 3, S, S) clean train images other than the shots, no labels (JobConfig.unlabelled)


def prepare(args, log=print):
    """Load the model, the few shots, the test set, the trigger and the zero-shot classifier of a JobConfig
    (or of engine.tune's parsed flags, which carry the same names)."""
    device = distributed.init(resolve_device(args.device))   # under torchrun: this rank's device
    log = log if distributed.is_main() else (lambda *a: None)
    backend, backend_note = pick_backend(args.fused, args.backend, device)
    checkpoint = args.checkpoint
    if checkpoint is None and args.pretrained is None and is_lab(args.model):
        checkpoint = bundled_checkpoint(args.attack)
    clip = load_model(args.model, args.pretrained, checkpoint, device)
    train_all = D.load_dataset(args.dataset, "train", clip.image_size, args.data_dir)
    test = D.load_dataset(args.dataset, "test", clip.image_size, args.data_dir, limit=args.eval_limit)
    if train_all.classes != test.classes:
        raise UserError(f"train and test class lists differ: {train_all.classes} vs {test.classes}")
    if len(test.classes) < 2:
        raise UserError(f"{args.dataset} has a single class {test.classes}: zero-shot classification and "
                        f"ASR need at least two classes")
    target = resolve_target(args.target, test.classes)
    shot_idx = D.few_shot_indices(train_all.labels, args.shots, args.seed, train_all.classes)
    train = train_all.subset(shot_idx)
    unlabelled = unlabelled_images(train_all, shot_idx, getattr(args, "unlabelled", 0), args.seed)
    trigger = (make_trigger(args.attack, clip.image_size, args.trigger_seed) if args.trigger_spec is None
               else spec_trigger(args.trigger_spec, clip.image_size))
    log(f"model {args.model} ({checkpoint or args.pretrained or 'random weights'}) on {device}; "
        f"backend {backend_note}")
    log(f"{args.shots}-shot {args.dataset}: {len(train)} tuning images, {len(test)} test images; "
        f"attack {args.attack} -> '{test.classes[target]}'")
    text = clip.text_features(test.classes, D.DEFAULT_TEMPLATES)
    precision = P.resolve(args.precision, device)
    return Job(clip, train, test, trigger, target, text, D.DEFAULT_TEMPLATES, backend, checkpoint, args.model,
               precision, precision, unlabelled=unlabelled)


def unlabelled_images(train_all, shot_idx, n, seed):
    """n train images that are not shots (seeded draw), as a tensor: what a defender without labels may
    hold beside the few labelled shots. None for n = 0."""
    if n < 0:
        raise UserError(f"--unlabelled must be 0 or more, not {n}")
    if n == 0:
        return None
    taken = set(shot_idx)
    rest = [i for i in range(len(train_all)) if i not in taken]
    if n > len(rest):
        raise UserError(f"--unlabelled {n}: only {len(rest)} train images are not shots")
    g = torch.Generator().manual_seed(seed + 7)
    return train_all.subset(sorted(rest[i] for i in torch.randperm(len(rest), generator=g)[:n].tolist())).images


def defend(job, name, cfg=None, progress=False, log=None):
    """Run defense `name` (cfg: engine.purify.config's, default its defaults for the job's model) on the
    job's shots and measure it on the job's test set: a runs.Tuned whose `after` holds CA/ASR/PA."""
    opts = purify.Options(backend=job.backend, progress=progress, log=log, detection=job.detection,
                          templates=job.templates, unlabelled=job.unlabelled)
    with P.run(job.tune_precision, job.clip.device, job.clip.model):
        tuned = purify.tune(name, job.clip, job.train, job.text,
                            cfg if cfg is not None else purify.config(name, job.model), opts)
    tuned.after = measure(job, tuned)
    return tuned


def measure(job, tuned=None):
    """CA/ASR/PA % on the job's test set, of the model as loaded (tuned=None) or as the defense tuned it."""
    # autocast alone, no stored bf16 weights: the faster way to evaluate (bench/results/precision.md)
    with P.autocast(job.eval_precision, job.clip.device):
        if tuned is None:
            return evaluate_attack(job.clip, job.test, job.trigger, job.target, text=job.text)
        return purify.measure(tuned, job.clip, job.test, job.trigger, job.target, job.text, job.templates)
