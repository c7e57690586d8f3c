"""Trigger inversions (what a backdoor's trigger could be, from a few clean shots) and the detector built
on them: targeted.py (stamped mask + pattern, or a warp, per class), stripes.py (1-D stripe signals per class),
detect.py (all three, and the outlier tests over classes), contrastive.py (CBPT's untargeted inversion)."""

# Inversions score classes at CLIP's trained temperature, fixed so that stand-in towers without a
# logit_scale work too.
LOGIT_SCALE = 100.0
