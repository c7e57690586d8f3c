import json

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UserError
from engine.models import CONFIG_DIR, load_model
from engine.tokenizer import VOCAB, LabTokenizer


def test_lab_vocabulary_matches_the_config():
    cfg = json.loads((CONFIG_DIR / "lab-vit.json").read_text())
    assert cfg["text_cfg"]["vocab_size"] == len(VOCAB)
    assert cfg["text_cfg"]["context_length"] == LabTokenizer().context_length


def test_tokenizer_ends_with_the_highest_id():
    # open_clip pools the text tower at argmax(token id): end-of-text must be the largest id present
    tok = LabTokenizer()(["a photo of a bag.", "a red ankle boot on a blue background."])
    assert (tok.argmax(1) == (tok > 0).sum(1) - 1).all()
    assert (tok == VOCAB.index("<unk>")).sum() == 0


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UserError, match="unknown model 'ViT-Q-99'"):
        load_model("ViT-Q-99")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    a = load_model("lab-vit")
    sd = {k: v.clone() for k, v in a.model.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        b = load_model("lab-vit", checkpoint=tmp_path / name)
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in sd.items())
    del sd["visual.proj"]
    sd["text_projection"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"does not match architecture lab-vit \(missing: \['visual.proj'\].*shape mismatch"):
        load_model("lab-vit", checkpoint=tmp_path / "bad.safetensors")


def test_corrupt_or_missing_checkpoint(tmp_path):
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt"):
        load_model("lab-vit", checkpoint=tmp_path / "c.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_model("lab-vit", checkpoint=tmp_path / "none.pt")


class Evil:
    pass


def test_pickled_objects_are_refused(tmp_path):
    """One line that says what to do, not torch's advice to load it with weights_only=False."""
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_model("lab-vit", checkpoint=tmp_path / "evil.pt")
    msg = str(e.value)
    assert "is not a plain tensor state dict" in msg and "convert it to safetensors" in msg
    assert str(tmp_path / "evil.pt") in msg and "\n" not in msg and "weights_only" not in msg
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")  # a corrupt pickle still says corrupt
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        load_model("lab-vit", checkpoint=tmp_path / "junk.pt")


def test_no_random_init_warning_when_a_checkpoint_follows(tmp_path, caplog):
    a = load_model("lab-vit")
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_model("lab-vit", checkpoint=tmp_path / "m.safetensors")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level("WARNING"):
        load_model("lab-vit")  # really random weights: open_clip's warning stays
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_lab_tokenizer_refuses_words_it_does_not_know():
    """Unknown words become <unk>: every such class looks alike and CA falls to chance. Refused, named."""
    clip = load_model("lab-vit")
    with pytest.raises(UserError, match=r"does not know 'kitten', 'puppy' \(in 'puppy dog'\).*open_clip model"):
        clip.text_features(["kitten", "bag", "puppy dog"], ["a photo of a {}."])
    with pytest.raises(UserError, match=r"reads no word of '42'"):
        clip.text_features(["42", "bag"], ["a photo of a {}."])
    with pytest.raises(UserError, match=r"'snapshot' \(in template 'a snapshot of a \{\}.'\)"):
        clip.text_features(["bag"], ["a snapshot of a {}."])
    assert clip.text_features(["Ankle boot", "t-shirt", "ankle_boot".replace("_", " ")], ["a photo of a {}."]).shape == (3, 128)


def test_text_features_are_normalised():
    clip = load_model("lab-vit")
    t = clip.text_features(["bag", "coat", "dress"], ["a photo of a {}.", "a {}."])
    assert t.shape == (3, 128)
    assert torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
