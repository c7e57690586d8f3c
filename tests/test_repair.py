"""The repair's pieces on the bundled lab models: the blend stand-in, several adversarial triggers at
once, and the detection it reuses. Tiny step counts: the plumbing and the invariants, not the scores."""
from dataclasses import replace

import pytest
import torch

from engine import data as D
from engine.defenses import repair
from engine.errors import UserError
from engine.evaluate import predict
from engine.inversion import targeted
from engine.models import bundled_checkpoint, load_model


@pytest.fixture(scope="module")
def lab():
    clip = load_model("lab-vit", checkpoint=bundled_checkpoint("blended"))
    train = D.load_fashion_mnist("train", limit=600)
    few = train.subset(D.few_shot_indices(train.labels, 3, 0))
    return clip, few, clip.text_features(few.classes, D.DEFAULT_TEMPLATES)


def test_blend_family_moves_each_pixel_at_most_alpha_of_the_way(lab):
    clip, few, text = lab
    cfg = targeted.TargetedConfig(steps=3, batch=4, blend_alpha=0.15)
    (patterns, none), sizes, losses = targeted.invert(clip, few.images, few.labels, text, cfg, classes=[8],
                                                      family="blend")
    assert none is None and sizes == [0.0] and len(losses) == 3
    fam = targeted.BlendFamily(1, few.images.shape[-1], cfg, None, clip.device, init=(patterns,))
    x = few.images[:5]
    out = fam.apply(x)[0]
    assert out.shape == x.shape
    assert (out - x).abs().max() <= 0.15 + 1e-6           # (1 - a) x + a P with P in [0, 1]
    torch.testing.assert_close(out, 0.85 * x + 0.15 * patterns[0], atol=2e-4, rtol=0)


def _stand_in_towards_8(lab, family, **cfg):
    clip, few, text = lab
    found = {"suspected_target": 8, "mask": {"target_index": 8}, "mask_trigger": None}
    return repair._stand_in(family, clip, few, text, found, repair.RepairConfig(extra=(family,), **cfg), progress=False)


def test_stand_in_inverts_a_blend_towards_the_suspected_target(lab):
    fam = _stand_in_towards_8(lab, "blend", extra_steps=2, blend_alpha=0.2)
    assert isinstance(fam, targeted.BlendFamily) and fam.alpha == 0.2
    with pytest.raises(Exception, match="use mask, blend, bounded or warp"):
        _stand_in_towards_8(lab, "additive")


def test_warp_stand_in_continues_from_its_inversion_and_shifts_no_pixel_beyond_the_bound(lab):
    clip, few, text = lab
    fam = _stand_in_towards_8(lab, "warp", extra_steps=3)
    assert isinstance(fam, targeted.WarpFamily)
    cfg = repair.RepairConfig().detect.mask
    (grids, z), _, _ = targeted.invert(clip, few.images, few.labels, text, cfg, classes=[8], family="warp", steps=3)
    torch.testing.assert_close(fam.grids(), grids)        # same seed and steps: the inverted warp, continued
    ramp = torch.linspace(-1, 1, grids.shape[1])
    identity = torch.stack(torch.meshgrid(ramp, ramp, indexing="xy"), dim=-1)
    shift_px = (fam.grids()[0] - identity).abs().max() * (grids.shape[1] / 2)
    assert 0 < shift_px <= cfg.warp_pixels + 1e-4
    trig = repair.AdversarialTrigger(8, text, repair.RepairConfig(), fam)
    assert trig(few.images[:4]).shape == few.images[:4].shape


def test_bounded_stand_in_changes_no_pixel_by_more_than_eps(lab):
    fam = _stand_in_towards_8(lab, "bounded", extra_steps=3, bounded_eps=0.07)
    assert isinstance(fam, targeted.BoundedFamily) and fam.eps == 0.07
    x = lab[1].images[:6]
    out = fam.apply(x)[0]
    assert out.shape == x.shape and (out - x).abs().max() <= 0.07 + 1e-6 and (out - x).abs().max() > 0.01
    assert (out >= 0).all() and (out <= 1).all()


def test_bounded_family_from_a_stripe_pattern_adds_that_pattern():
    s, eps = 8, 0.1
    stripe = 0.05 * torch.sin(torch.arange(s, dtype=torch.float32)).view(1, 1, s)   # one vertical stripe pattern
    fam = targeted.BoundedFamily(1, s, targeted.TargetedConfig(bounded_eps=eps), None, torch.device("cpu"),
                                 init=(stripe[None],))
    x = torch.full((2, 3, s, s), 0.5)
    torch.testing.assert_close(fam.apply(x)[0], x + stripe, atol=1e-5, rtol=0)


def test_weighted_distill_loss_is_the_weighted_mean_of_the_cosine_gaps():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 3.0])
    gap = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(repair.distill_loss(a, b, w), (w * gap).sum() / w.sum())
    torch.testing.assert_close(repair.distill_loss(a, b), gap.mean())


def test_clean_focus_changes_the_tuning_only_when_the_frozen_model_predicts_the_focus_class(lab):
    clip, few, text = lab
    trig = lambda x: targeted.stamp(x, torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (no-op trigger)
    pred = (torch.nn.functional.normalize(clip.encode_image(clip.normalise(few.images)), dim=-1) @ text.t()).argmax(1)
    hit = int(pred.mode().values)              # the class the frozen model predicts most often on the shots
    plain_cfg = repair.RepairConfig(epochs=1, batch=8)
    focus_cfg = repair.RepairConfig(epochs=1, batch=8, clean_focus=4.0)
    _, plain = repair.tune_prompts(clip, few.images, trig, plain_cfg, progress=False)
    _, focused = repair.tune_prompts(clip, few.images, trig, focus_cfg, progress=False, focus=(text, hit))
    assert plain != focused
    # a class no image is predicted as: every weight is 1, the same run as without the focus
    _, same = repair.tune_prompts(clip, few.images, trig, focus_cfg, progress=False, focus=(text, -1))
    assert same == plain


def test_several_adversarial_triggers_are_all_updated_and_the_prompts_tuned(lab):
    clip, few, text = lab
    cfg = repair.RepairConfig(epochs=1, batch=8, adv_steps=2)
    s = few.images.shape[-1]
    mask = targeted.MaskFamily(1, s, targeted.TargetedConfig(), torch.Generator().manual_seed(0), clip.device)
    blend = targeted.BlendFamily(1, s, targeted.TargetedConfig(), torch.Generator().manual_seed(1), clip.device)
    before = [p.detach().clone() for fam in (mask, blend) for p in fam.params]
    triggers = [repair.AdversarialTrigger(8, text, cfg, fam) for fam in (mask, blend)]
    prompts, history = repair.tune_prompts(clip, few.images, triggers, cfg, progress=False)
    after = [p.detach() for fam in (mask, blend) for p in fam.params]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))   # each trigger took its adversarial steps
    assert len(history) == 1 and torch.isfinite(torch.tensor(history)).all()
    assert any(p.abs().sum() > 0 for p in prompts.parameters()) and not any(p.requires_grad for p in prompts.parameters())


def test_unlabelled_images_join_the_clean_distillation(lab):
    clip, few, text = lab
    cfg = repair.RepairConfig(epochs=1, batch=8)
    trig = lambda x: targeted.stamp(x, torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (no-op trigger)
    extra = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, plain = repair.tune_prompts(clip, few.images, trig, cfg, progress=False)
    _, more = repair.tune_prompts(clip, few.images, trig, cfg, progress=False, unlabelled=extra)
    assert plain != more                      # the same seed and shots: only the extra images differ


def test_job_draws_unlabelled_images_apart_from_the_shots():
    from engine.errors import UserError
    from engine.job import JobConfig, prepare, unlabelled_images
    train = D.load_fashion_mnist("train", limit=300)
    shots = D.few_shot_indices(train.labels, 2, 0)
    imgs = unlabelled_images(train, shots, 25, 0)
    assert imgs.shape == (25, 3, 32, 32)
    assert not any(torch.equal(imgs[i], train.images[j]) for i in range(25) for j in shots)
    assert unlabelled_images(train, shots, 0, 0) is None
    with pytest.raises(UserError, match="only"):
        unlabelled_images(train, shots, 1000, 0)
    with pytest.raises(UserError, match="0 or more"):
        prepare(JobConfig(shots=1, eval_limit=10, unlabelled=-1), log=lambda *a: None)


def test_gated_features_take_the_prompted_ones_only_where_the_frozen_model_says_k():
    g = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    A, B = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    x = torch.randn(40, 5, generator=g)
    calls = []
    prompted = lambda v: (calls.append(len(v)), v @ B)[1]  # noqa: E731
    from engine.purify import gated
    k = int((x @ A @ text.t()).argmax(1).mode().values)
    z = gated(lambda v: v @ A, prompted, text, k)(x)
    pick = (torch.nn.functional.normalize(x @ A, dim=-1) @ text.t()).argmax(1) == k
    assert 0 < pick.sum() < len(x)
    torch.testing.assert_close(z[pick], x[pick] @ B)
    torch.testing.assert_close(z[~pick], x[~pick] @ A)
    assert calls == [int(pick.sum())]                 # the prompted encoder sees the gated rows only


def test_folded_gated_classifier_matches_its_two_streams(lab):
    from export.folded import FoldedClassifier
    clip, few, text = lab
    torch.manual_seed(0)
    prompts = torch.randn(6, 4, 128) * 0.5
    args = (clip.visual, text, clip.logit_scale)
    x = clip.normalise(few.images[:12])
    with torch.no_grad():
        lp, zp = FoldedClassifier(*args, prompts, 0)(x)
        lf, zf = FoldedClassifier(*args)(x)
        k = int(lf.argmax(1).mode().values)
        lg, zg = FoldedClassifier(*args, prompts, 0, gate=k)(x)
    pick = lf.argmax(1) == k
    assert 0 < pick.sum() < len(x)
    torch.testing.assert_close(lg[pick], lp[pick], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg[~pick], lf[~pick], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zg[~pick], zf[~pick], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tune_cli_records_the_gate_and_export_reads_it(tmp_path):
    """engine.tune --defense repair on the bundled BadNet model: the run records the suspected target as
    the gate (results.json and the prompts' metadata), and the folded export picks it up."""
    import json

    from engine import runs, tune
    from export import folded
    out = tmp_path / "run"
    res = tune.main(["--defense", "repair", "--shots", "4", "--epochs", "1", "--eval-limit", "300", "--quiet",
                     "--out", str(out)])
    assert res["detection"]["verdict"] == "backdoored" and res["gate"] == "bag"
    assert json.loads((out / "results.json").read_text())["gate"] == "bag"
    run = runs.read(out)
    assert run.gate == D.FASHION_CLASSES.index("bag")
    assert folded.from_run(out).module.gate == run.gate
    assert res["gate_keep"] is not None and run.gate_keep == pytest.approx(res["gate_keep"])   # the keep cut too
    assert folded.from_run(out).module.gate_keep == pytest.approx(run.gate_keep)


def test_an_extra_of_the_flagged_family_is_a_restart_from_another_seed(lab):
    clip, few, text = lab
    cfg = repair.RepairConfig(extra=("mask",), extra_steps=3)
    m0, p0 = torch.full((1, 32, 32), 0.05), torch.full((3, 32, 32), 0.5)
    found = {"suspected_target": 8, "mask": {"target_index": 8}, "mask_trigger": (m0, p0)}
    own = repair._stand_in("mask", clip, few, text, found, cfg, progress=False)
    torch.testing.assert_close(own.result()[0][0], m0, atol=1e-4, rtol=0)        # the detector's own trigger
    first = repair._stand_in("mask", clip, few, text, found, cfg, progress=False, restart=1)
    second = repair._stand_in("mask", clip, few, text, found, cfg, progress=False, restart=2)
    assert not torch.allclose(first.result()[1], second.result()[1])           # another seed, another start
    assert not torch.allclose(first.result()[0][0], m0)


def test_a_pattern_only_adversary_keeps_its_mask(lab):
    clip, few, text = lab
    cfg = repair.RepairConfig(epochs=1, batch=8, adv_mask=False)
    m0, p0 = torch.full((1, 32, 32), 0.05), torch.full((3, 32, 32), 0.5)
    fam = repair._mask_family(m0, p0, moving_mask=False)
    mask_before, pattern_before = fam.mask_logit.detach().clone(), fam.pattern_logit.detach().clone()
    repair.tune_prompts(clip, few.images, [repair.AdversarialTrigger(8, text, cfg, fam)], cfg, progress=False)
    assert torch.equal(fam.mask_logit, mask_before) and not torch.equal(fam.pattern_logit, pattern_before)


def test_the_decision_term_needs_the_focus_classifier_and_changes_the_tuning(lab):
    clip, few, text = lab
    trig = lambda x: targeted.stamp(x, torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (no-op trigger)
    _, plain = repair.tune_prompts(clip, few.images, trig, repair.RepairConfig(epochs=1, batch=8), progress=False)
    cfg = repair.RepairConfig(epochs=1, batch=8, w_clean_ce=2.0)
    _, with_ce = repair.tune_prompts(clip, few.images, trig, cfg, progress=False, focus=(text, -1))
    _, no_focus = repair.tune_prompts(clip, few.images, trig, cfg, progress=False)
    assert with_ce != plain and no_focus == plain      # the term reads the classifier that `focus` brings
    assert all(b > a for a, b in zip(plain, with_ce))   # an added non-negative term: every step's loss grows


def test_the_decision_term_can_aim_at_the_shots_labels(lab):
    clip, few, text = lab
    trig = lambda x: targeted.stamp(x, torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (no-op trigger)
    frozen_pred = (torch.nn.functional.normalize(clip.encode_image(clip.normalise(few.images)), dim=-1) @ text.t()).argmax(1)
    # no augmentation: the loss's frozen predictions are then those of the shots as given
    cfg = repair.RepairConfig(epochs=1, batch=8, w_clean_ce=2.0, augment=False)
    labelled = replace(cfg, clean_ce_labels=True)
    _, towards_frozen = repair.tune_prompts(clip, few.images, trig, cfg, progress=False, focus=(text, -1))
    # labels equal to the frozen predictions: the same run; the shots' real labels differ from them somewhere
    _, same = repair.tune_prompts(clip, few.images, trig, labelled, progress=False, focus=(text, -1), labels=frozen_pred)
    _, real = repair.tune_prompts(clip, few.images, trig, labelled, progress=False, focus=(text, -1), labels=few.labels)
    assert (frozen_pred != few.labels).any()
    assert same == towards_frozen and real != towards_frozen
    with pytest.raises(UserError, match="labels"):
        repair.tune_prompts(clip, few.images, trig, labelled, progress=False, focus=(text, -1))
    with pytest.raises(UserError, match="not both"):
        repair.tune_prompts(clip, few.images, trig, replace(labelled, clean_ce_soft=True), progress=False,
                            focus=(text, -1), labels=few.labels)


def test_the_soft_decision_term_distils_the_frozen_softmax(lab, monkeypatch):
    clip, few, text = lab
    trig = lambda x: targeted.stamp(x, torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (no-op trigger)
    cfg = repair.RepairConfig(epochs=1, batch=8, w_clean_ce=2.0, augment=False, clean_ce_soft=True)
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, target, **kw):
        seen.append(target)
        return cross_entropy(logits, target, **kw)
    monkeypatch.setattr(repair.F, "cross_entropy", spy)
    repair.tune_prompts(clip, few.images, trig, cfg, progress=False, focus=(text, -1))
    frozen = torch.nn.functional.normalize(clip.encode_image(clip.normalise(few.images)).float(), dim=-1)
    want = torch.softmax(repair.LOGIT_SCALE * frozen @ text.t(), dim=-1)
    got = torch.cat(seen)   # one batch per call, in order: the shots are drawn in a random order, so match rows
    assert got.shape == want.shape and torch.allclose(got.sum(1), torch.ones(len(got)))
    dist = torch.cdist(got, want)
    # every target is the frozen softmax of one of the shots (batches of 8 against all at once differ in float
    # rounding, which the logit scale amplifies: up to 3e-4 seen; a one-hot target misses an unsaturated row by far more)
    assert dist.min(1).values.max() < 2e-3


@pytest.mark.parametrize("flagged_by, also_mask, expected", [("stripes", True, ["bounded", "mask"]),
                                                             ("stripes", False, ["bounded"]),
                                                             ("mask", True, ["mask"])])
def test_also_mask_adds_the_mask_stand_in_only_beside_another_family(lab, monkeypatch, flagged_by, also_mask, expected):
    clip, few, text = lab
    seen = {}

    def record_triggers(clip, images, triggers, *args, **kwargs):   # the prompt tuning itself is not under test
        seen["families"] = [t.fam.name for t in triggers]
        return None, []
    monkeypatch.setattr(repair, "tune_prompts", record_triggers)
    m0, p0 = torch.full((1, 32, 32), 0.05), torch.full((3, 32, 32), 0.5)
    found = {"verdict": "backdoored", "suspected_target": 8, "flagged_by": flagged_by, "trigger": None,
             "mask": {"target_index": 8}, "mask_trigger": (m0, p0), "stripe_pattern": torch.zeros(1, 1, 32)}
    repair.tune(clip, few, text, repair.RepairConfig(also_mask=also_mask, extra=()), progress=False, detection=found)
    assert seen["families"] == expected


def test_the_keep_rule_leaves_the_frozen_feature_where_the_prompts_barely_moved_it():
    from engine.purify import gated
    g = torch.Generator().manual_seed(5)
    text = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=-1)
    x = torch.randn(60, 6, generator=g)
    noise = torch.randn(60, 6, generator=g)
    scale = torch.linspace(0, 3, 60)[:, None]              # the prompts move some images far, some barely
    frozen, prompted = (lambda v: v), (lambda v: v + scale[:len(v)] * noise[:len(v)])
    pick = (torch.nn.functional.normalize(x, dim=-1) @ text.t()).argmax(1) == 0
    z = gated(frozen, lambda v: prompted(x)[pick], text, 0, keep=0.9)(x)
    cos = torch.nn.functional.cosine_similarity(prompted(x), x, dim=-1)
    near, far = pick & (cos >= 0.9), pick & (cos < 0.9)
    assert near.any() and far.any()
    torch.testing.assert_close(z[near], x[near])
    torch.testing.assert_close(z[far], prompted(x)[far])
    torch.testing.assert_close(z[~pick], x[~pick])


def test_folded_keep_rule_matches_the_torch_gate(lab):
    from export.folded import FoldedClassifier
    from engine.purify import gated
    clip, few, text = lab
    torch.manual_seed(0)
    prompts = torch.randn(6, 4, 128) * 0.5
    x = clip.normalise(few.images[:24])
    with torch.no_grad():
        lf, zf = FoldedClassifier(clip.visual, text, clip.logit_scale)(x)
        lp, zp = FoldedClassifier(clip.visual, text, clip.logit_scale, prompts, 0)(x)
        k = int(lf.argmax(1).mode().values)
        pick = lf.argmax(1) == k
        keep = float(torch.nn.functional.cosine_similarity(zp[pick], zf[pick]).median())   # keeps about half
        lg, zg = FoldedClassifier(clip.visual, text, clip.logit_scale, prompts, 0, gate=k, gate_keep=keep)(x)
        torch_z = gated(lambda v: FoldedClassifier(clip.visual, text, clip.logit_scale)(v)[1],
                        lambda v: FoldedClassifier(clip.visual, text, clip.logit_scale, prompts, 0)(v)[1], text, k, keep)(x)
    kept = pick & (torch.nn.functional.cosine_similarity(zp, zf) >= keep)
    assert kept.any() and (pick & ~kept).any()
    torch.testing.assert_close(zg, torch_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg[kept], lf[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg[pick & ~kept], lp[pick & ~kept], rtol=1e-5, atol=1e-5)


def test_keep_threshold_is_the_quantile_over_the_shots_the_stand_ins_send_to_k(lab):
    import torch.nn.functional as F
    clip, few, text = lab
    prompts = repair.prompted_vit.VisualPrompts.for_visual(clip.visual, 0, 4, 0.5)
    grey = lambda x: targeted.stamp(x, torch.ones(1, 32, 32), torch.full((3, 32, 32), 0.5))  # noqa: E731
    k = int(predict(clip, grey(few.images[:1]), text)[0])
    with torch.no_grad():
        xt = clip.normalise(grey(few.images[predict(clip, few.images, text) != k]))   # one grey image: sent to k
        cos = F.cosine_similarity(repair.prompted_vit.forward(clip.visual, prompts, xt, "shared")["feature"],
                                  clip.encode_image(xt), dim=-1)
    got = repair.keep_threshold(clip, prompts, "shared", few.images, [grey], text, k, 0.3)
    assert got == pytest.approx(torch.quantile(cos, 0.3).item(), abs=1e-5)
    identity = lambda x: x  # noqa: E731 (sends nothing to k that the frozen model did not already put there)
    assert repair.keep_threshold(clip, prompts, "shared", few.images, [identity], text, k, 0.3) is None


def test_keep_threshold_holds_for_each_stand_in_or_for_their_pool(lab):
    clip, few, text = lab
    prompts = repair.prompted_vit.VisualPrompts.for_visual(clip.visual, 0, 4, 0.5)

    def flat(level):   # every shot becomes the same flat image: one cosine per stand-in
        return lambda x: targeted.stamp(x, torch.ones(1, 32, 32), torch.full((3, 32, 32), level))  # noqa: E731

    def frozen_class(t):
        return int(predict(clip, t(few.images[:1]), text)[0])

    k = frozen_class(flat(0.5))
    other = next(flat(v) for v in (0.45, 0.55, 0.4, 0.6, 0.35, 0.65) if frozen_class(flat(v)) == k)
    each = repair.keep_threshold(clip, prompts, "shared", few.images, [flat(0.5), other], text, k, 0.3, each=True)
    single = [repair.keep_threshold(clip, prompts, "shared", few.images, [t], text, k, 0.3) for t in (flat(0.5), other)]
    pooled = repair.keep_threshold(clip, prompts, "shared", few.images, [flat(0.5), other], text, k, 0.3)
    assert abs(single[0] - single[1]) > 1e-4        # two stand-ins the prompts move by different amounts
    assert each == pytest.approx(max(single), abs=1e-6)
    assert pooled == pytest.approx(min(single), abs=1e-6)   # as many shots of each: the 0.3-quantile is the lower


def _cut_cost(c, triggered, own, classes, weight):
    return (own < c).float().mean() / classes + weight * (triggered >= c).float().mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weight", [0.02, 0.25, 3.0])
def test_balanced_cut_reaches_the_least_cost_of_a_fine_grid(seed, weight):
    g = torch.Generator().manual_seed(seed)
    triggered = 0.3 + 0.5 * torch.rand(int(torch.randint(5, 300, (1,), generator=g)), generator=g)
    own = 0.55 + 0.4 * torch.rand(int(torch.randint(1, 17, (1,), generator=g)), generator=g)
    c = repair.balanced_cut(triggered, own, 10, weight)
    grid = torch.linspace(0.0, 1.2, 24001)
    best = min(_cut_cost(v, triggered, own, 10, weight).item() for v in grid)
    assert _cut_cost(c, triggered, own, 10, weight).item() == pytest.approx(best, abs=1e-7)
    # and no cosine sits on the cut: it lies inside an interval, away from both lists' values
    assert not torch.isclose(torch.cat([triggered, own]), torch.tensor(c), atol=1e-7).any()


def test_balanced_cut_splits_separated_lists_midway_and_leans_to_removal_on_ties():
    triggered, own = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.8, 0.9])
    assert repair.balanced_cut(triggered, own, 10, 0.25) == pytest.approx(0.6)   # midway between 0.4 and 0.8
    # a costly leak: every triggered shot must be answered by the prompts, whatever the own shots lose
    assert repair.balanced_cut(torch.tensor([0.2, 0.85]), own, 10, 10.0) > 0.85
    # a cheap leak: the own shots all keep their answer, the top triggered shot is left
    assert 0.4 < repair.balanced_cut(torch.tensor([0.2, 0.4, 0.85]), own, 10, 0.01) <= 0.8
    # a tie: keeping the 0.7 shot, or answering it and one of two own shots, cost the same; the higher cut wins
    assert repair.balanced_cut(torch.tensor([0.2, 0.7]), torch.tensor([0.5, 0.9]), 10, 0.1) == pytest.approx(0.8)


def test_keep_threshold_balances_against_the_target_class_shots_read_as_it(lab, monkeypatch):
    clip, few, text = lab
    prompts = repair.prompted_vit.VisualPrompts.for_visual(clip.visual, 0, 4, 0.5)
    grey = lambda x: targeted.stamp(x, torch.ones(1, 32, 32), torch.full((3, 32, 32), 0.5))  # noqa: E731
    k = int(predict(clip, grey(few.images[:1]), text)[0])
    pred = predict(clip, few.images, text)
    own = few.images[(pred == k) & (few.labels == k)]
    assert len(own)   # the fixture's shots hold some of class k read as k
    moved = repair._moved(clip, prompts, "shared", grey(few.images[pred != k]), text, k)
    expected = repair.balanced_cut(moved, repair._moved(clip, prompts, "shared", own, text, k), len(text), 0.25)
    got = repair.keep_threshold(clip, prompts, "shared", few.images, [grey], text, k, 0.3, labels=few.labels,
                                weight=0.25)
    assert got == pytest.approx(expected, abs=1e-6)
    # the cap: at most that quantile of the own shots' cosines; a balanced cut above them all shows it
    own_cos = repair._moved(clip, prompts, "shared", own, text, k)
    monkeypatch.setattr(repair, "balanced_cut", lambda *a: 2.0)
    for cap, want in ((0.0, 2.0), (0.5, torch.quantile(own_cos, 0.5).item()), (1.0, own_cos.max().item())):
        assert repair.keep_threshold(clip, prompts, "shared", few.images, [grey], text, k, 0.3, labels=few.labels,
                                     weight=0.25, cap=cap) == pytest.approx(want, abs=1e-6)
    monkeypatch.undo()
    # without labels (or weight 0) the quantile rule stands
    assert repair.keep_threshold(clip, prompts, "shared", few.images, [grey], text, k, 0.3, weight=0.25) == \
        pytest.approx(torch.quantile(moved, 0.3).item(), abs=1e-5)
    # and with the quantile rule off too, there is no cut
    assert repair.keep_threshold(clip, prompts, "shared", few.images, [grey], text, k, 0.0, weight=0.25) is None


def test_w_extra_weighs_each_extra_stand_in_on_its_own(lab):
    from dataclasses import replace
    clip, few, text = lab
    t = lambda x: targeted.stamp(x, torch.full((1, 32, 32), 0.1), torch.full((3, 32, 32), 0.9))  # noqa: E731
    far = lambda x: targeted.stamp(x, torch.ones(1, 32, 32), torch.zeros(3, 32, 32))  # noqa: E731 (all black)
    cfg = repair.RepairConfig(epochs=1, batch=8)
    _, one = repair.tune_prompts(clip, few.images, [t], cfg, progress=False)
    _, muted = repair.tune_prompts(clip, few.images, [t, far], replace(cfg, w_extra=0.0), progress=False)
    _, twice = repair.tune_prompts(clip, few.images, [t, t], cfg, progress=False)
    _, summed = repair.tune_prompts(clip, few.images, [t, t], replace(cfg, w_extra=cfg.w_trigger), progress=False)
    assert muted == pytest.approx(one, rel=1e-4)      # an extra at weight 0 changes nothing
    assert twice == pytest.approx(one, rel=1e-4)      # averaged (w_extra None): the same term twice is the term
    assert summed != pytest.approx(one, rel=1e-3)     # at its own weight it adds to the first


@pytest.mark.parametrize("keep_from,n_read", [("all", 2), ("flagged", 1)])
def test_keep_cut_reads_every_stand_in_or_the_flagged_familys_alone(lab, monkeypatch, keep_from, n_read):
    clip, few, text = lab
    m, p = torch.zeros(1, 32, 32), torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    m[:, 26:30, 26:30] = 1.0
    found = {"verdict": "backdoored", "flagged_by": "mask", "suspected_target": 8, "mask_trigger": (m, p), "trigger": None,
             "mask": {"target_index": 8}}
    read = []
    monkeypatch.setattr(repair, "keep_threshold", lambda *a, **k: read.append(len(a[4])) or 0.5)
    cfg = repair.RepairConfig(epochs=1, batch=8, extra_steps=2, keep_from=keep_from)
    res = repair.tune(clip, few, text, cfg, progress=False, detection=found)
    assert read == [n_read] and res["keep"] == 0.5


def test_an_unknown_keep_from_fails_before_any_work(lab):
    from engine.errors import UserError
    clip, few, text = lab
    with pytest.raises(UserError, match="keep_from 'some'"):
        repair.tune(clip, few, text, repair.RepairConfig(keep_from="some"), progress=False, detection=None)
