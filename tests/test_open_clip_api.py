"""The open_clip internals the engine relies on. engine/prompted_vit.py, engine/diagnostics.py and
export/folded.py run the ViT block by block, so they call VisionTransformer's private `_embeds` (patch +
class + positional embeddings, ln_pre) and `_pool` (ln_post + pooling), which open_clip may rename in
any release; pyproject.toml pins the range they were checked in. This test says which one went."""
import importlib.metadata

import pytest
import torch

from engine import prompted_vit
from engine.models import load_model

PRIVATE = ("_embeds", "_pool")
PUBLIC = ("transformer", "proj", "pool_type", "attn_pool", "image_size")
BLOCK = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def _pinned():
    return f"open_clip_torch {importlib.metadata.version('open_clip_torch')} (pyproject.toml pins >=3.0,<3.4)"


@pytest.fixture(scope="module")
def clip():
    return load_model("lab-vit")  # random weights: only the structure matters here


@pytest.fixture(scope="module")
def visual(clip):
    return clip.visual


def test_private_vision_transformer_methods_exist(visual):
    missing = [name for name in PRIVATE if not callable(getattr(visual, name, None))]
    assert not missing, (f"{_pinned()}: VisionTransformer has no {missing}; engine/prompted_vit.py, "
                         f"engine/diagnostics.py and export/folded.py call them: adapt them or pin open_clip lower")
    gone = [name for name in PUBLIC if not hasattr(visual, name)]
    assert not gone, f"{_pinned()}: VisionTransformer has no attribute(s) {gone}, which engine/prompted_vit.py reads"
    block = visual.transformer.resblocks[0]
    gone = [name for name in BLOCK if not hasattr(block, name)]
    assert not gone, f"{_pinned()}: ResidualAttentionBlock has no {gone}, which prompted_vit.shared_block uses"
    assert isinstance(block.attn, torch.nn.MultiheadAttention), \
        f"{_pinned()}: the block's attention is a {type(block.attn).__name__}, not nn.MultiheadAttention"


def test_embeds_blocks_pool_is_the_forward(clip, visual):
    """_embeds, the blocks, then prompted_vit._head (_pool + proj) must still be VisionTransformer.forward."""
    x = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = visual._embeds(x)
        for blk in visual.transformer.resblocks:
            h = blk(h)
        ours, theirs = prompted_vit._head(visual, h), visual(x)
    assert torch.allclose(ours, theirs, atol=1e-5), \
        f"{_pinned()}: _embeds -> blocks -> _pool no longer reproduces VisionTransformer.forward"
