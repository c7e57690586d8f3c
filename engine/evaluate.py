"""Zero-shot evaluation of a (possibly prompted) CLIP on an ImageSet, clean and triggered."""
import torch
import torch.nn.functional as F

from .data import DEFAULT_TEMPLATES
from .metrics import attack_success_rate, clean_accuracy, poisoned_accuracy


@torch.no_grad()
def predict(clip, images, text, encode=None, batch=500, transform=None):
    """Top-1 class of each [0, 1] image. `encode` maps normalised images to features (default: the
    unprompted image tower); `transform` (a trigger) is applied to raw images first."""
    encode = encode or clip.model.encode_image
    preds = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(clip.device)
        if transform is not None:
            x = transform(x)
        z = F.normalize(encode(clip.normalise(x)).float(), dim=-1)
        preds.append((z @ text.t()).argmax(1).cpu())
    return torch.cat(preds)


def zero_shot_accuracy(clip, data, encode=None, templates=DEFAULT_TEMPLATES):
    text = clip.text_features(data.classes, templates)
    return clean_accuracy(predict(clip, data.images, text, encode), data.labels)


def evaluate_attack(clip, data, trigger, target, encode=None, text=None, templates=DEFAULT_TEMPLATES):
    """{'ca', 'asr', 'pa'} in percent, on the clean images and on the same images with the trigger."""
    text = clip.text_features(data.classes, templates) if text is None else text
    clean = predict(clip, data.images, text, encode)
    trig = predict(clip, data.images, text, encode, transform=trigger)
    return {"ca": clean_accuracy(clean, data.labels),
            "asr": attack_success_rate(trig, data.labels, target),
            "pa": poisoned_accuracy(trig, data.labels)}
