"""Copy the benchmark tables (bench/results/*.md) into README.md between their markers, so the README's
numbers are always the scripts' output:  <!-- bench:NAME --> ... <!-- /bench:NAME -->

    python -m bench.readme"""
import re
from pathlib import Path

from engine import manifest
from engine.io import atomic_path

ROOT = Path(__file__).resolve().parent.parent


def lab_models_table():
    """The bundled lab models and their measured no-defense numbers, from checkpoints/lab/manifest.json."""
    lines = ["| model | bundled | poisoned pairs | no-defense CA % | no-defense ASR % | build s |",
             "|---|---|---|---|---|---|"]
    for name, r in manifest.models().items():
        rate = f"{100 * r['poison_rate']:.1f}%" if "poison_rate" in r else "-"
        asr = f"{r['asr']:.2f}" if "asr" in r else "-"
        bundled = "yes" if manifest.bundled(r) else "no (" + r.get("note", "rebuild: see command") + ")"
        lines.append(f"| {name} | {bundled} | {rate} | {r['ca']:.2f} | {asr} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in re.findall(r"<!-- bench:([\w/-]+) -->", text):
        table = ROOT / "bench" / "results" / f"{name}.md"
        if name == "lab-models":
            content = lab_models_table()
        elif table.is_file():
            content = table.read_text()
        else:
            print(f"skip {name}: {table} not found (run its benchmark first)")
            continue
        text = re.sub(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)",
                      lambda m: m.group(1) + content + m.group(2), text, flags=re.S)
        print(f"updated {name}")
    with atomic_path(readme) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    main()
