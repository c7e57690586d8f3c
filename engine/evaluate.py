"""Zero-shot evaluation of a (possibly prompted) CLIP on an ImageSet, clean and triggered."""
import torch
import torch.nn.functional as F

from .data import DEFAULT_TEMPLATES
from .errors import UserError
from . import distributed
from .metrics import attack_counts, attack_rates, clean_accuracy


def image_features(clip, images, encode=None):
    """L2-normalised features (N, E) of [0, 1] images on clip.device. `encode` maps normalised images to
    features (default: the unprompted image tower). Differentiable: callers choose no_grad."""
    encode = encode or clip.encode_image
    return F.normalize(encode(clip.normalise(images.to(clip.device))).float(), dim=-1)


@torch.no_grad()
def features(clip, images, encode=None, transform=None, batch=500):
    """image_features of many images, in batches, without gradients; `transform` (a trigger) is applied
    to each batch of raw images first."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(clip.device)
        out.append(image_features(clip, x if transform is None else transform(x), encode))
    return torch.cat(out)


def predict(clip, images, text, encode=None, batch=500, transform=None):
    """Top-1 class of each [0, 1] image under the classifier `text` (K, E): argmax of z @ text.t()."""
    return (features(clip, images, encode, transform, batch) @ text.t()).argmax(1).cpu()


def zero_shot_accuracy(clip, data, encode=None, templates=DEFAULT_TEMPLATES):
    text = clip.text_features(data.classes, templates)
    return clean_accuracy(predict(clip, data.images, text, encode), data.labels)


def evaluate_attack(clip, data, trigger, target, encode=None, text=None, templates=DEFAULT_TEMPLATES):
    """{'ca', 'asr', 'pa'} in percent, on the clean images and on the same images with the trigger."""
    if not (data.labels != target).any():  # before any prediction: say which class, not just "undefined"
        raise UserError(f"ASR is undefined: all {len(data)} test images are of the target class "
                        f"'{data.classes[target]}'; the test set needs images of other classes (a one-class "
                        f"data set, or an image limit that keeps only the target class)")
    text = clip.text_features(data.classes, templates) if text is None else text
    images, labels, _ = distributed.shard(data.images, data.labels)   # under torchrun: this rank's share
    clean = predict(clip, images, text, encode)
    trig = predict(clip, images, text, encode, transform=trigger)
    return attack_rates(distributed.sum_counts(attack_counts(clean, trig, labels, target)))
