"""The README's Python API example runs as written (with smaller data and a few tuning steps)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the example's settings -> fast ones; each must be found, so an edit of the README cannot skip them
SHRINK = {'D.load_fashion_mnist("train")': 'D.load_fashion_mnist("train", limit=3000)',
          'limit=2000': 'limit=200',
          'purify.config("repair", "lab-vit")':
              'replace(purify.config("repair", "lab-vit"), epochs=1, always=True, detect=_tiny_detect)'}


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    for old, new in SHRINK.items():
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    from engine.inversion.detect import DetectConfig
    from engine.inversion.stripes import StripeConfig
    from engine.inversion.targeted import TargetedConfig
    tiny = DetectConfig(mask=TargetedConfig(steps=3), stripes=StripeConfig(steps=2))
    monkeypatch.chdir(tmp_path)
    from dataclasses import replace
    exec(compile(code, "README.md", "exec"), {"_tiny_detect": tiny, "replace": replace})
    out = capsys.readouterr().out
    assert re.search(r"(backdoored|clean) towards \w", out) and "'asr'" in out
    assert (tmp_path / "purified.onnx").stat().st_size > 100_000
