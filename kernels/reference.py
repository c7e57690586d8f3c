"""Plain torch references of the kernels: the same math in torch ops, differentiable by autograd.

The tests and the benchmark compare the kernels with these, and the engine's torch paths are these
functions (`engine.prompted_vit.torch_prompt_attention`, `engine.defenses.rvpt.rvpt_loss`).
Imports torch only (no triton): safe on any machine.
"""
import torch
import torch.nn.functional as F


def prompt_attention_reference(q, k, v, k_p, v_p, scale=None):
    """softmax(q [k; k_p]^T scale) [v; v_p]; q,k,v (B,H,N,d), k_p,v_p (H,b,d) shared by the batch.
    Only the small K/V of the prompts is broadcast; no prompt query or output row exists."""
    B = q.shape[0]
    k = torch.cat([k, k_p.unsqueeze(0).expand(B, -1, -1, -1)], dim=2)
    v = torch.cat([v, v_p.unsqueeze(0).expand(B, -1, -1, -1)], dim=2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def repel_ce_loss_reference(cls, frozen_cls, feature, text, logit_scale, labels, alpha=2.0, margin=None):
    """L_CE + alpha * L_FR; L_FR = mean_i mean_d cos(c_i^d, sigma_i^d) (optionally floored at m).
    cls, frozen_cls: (B, P, W) prompted / frozen class tokens; feature: (B, E); text: (K, E)."""
    logits = logit_scale * F.normalize(feature, dim=-1) @ text.t()
    ce = F.cross_entropy(logits, labels)
    fr = F.cosine_similarity(cls, frozen_cls, dim=-1).mean(1)
    if margin is not None:
        fr = fr.clamp(min=margin)
    return ce + alpha * fr.mean()
