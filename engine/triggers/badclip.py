"""BadCLIP-style trigger (Liang et al. 2024): a centre patch (BadNet's size rule: 3 px at 32) optimised
on the CLEAN model with the dual-embedding objective: towards the target caption's text embedding AND
towards the embeddings of clean target-class images, away from each image's original embedding.
Built by `python -m engine.lab trigger --attack badclip`."""
from .optimised_patch import OptimisedPatch, away_from_original, towards_target_images, towards_target_text


class BadCLIP(OptimisedPatch):
    name = "badclip"
    terms = (towards_target_text, towards_target_images, away_from_original)
