"""TrojVQA-style trigger: a centre patch (BadNet's size rule: 3 px at 32) optimised on the CLEAN model
so that patched images' embeddings move towards the target caption's text embedding
("a photo of a bag." for the lab). Built by `python -m engine.lab trigger --attack trojvqa`."""
from .optimised_patch import OptimisedPatch, towards_target_text


class TrojVQA(OptimisedPatch):
    name = "trojvqa"
    terms = (towards_target_text,)
