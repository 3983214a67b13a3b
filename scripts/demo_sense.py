"""Count what a demo run reads off pictures it never saw: ``python scripts/demo_sense.py RUN [--pictures 24]``.

For each fresh demo picture (data.synthetic_mix.demo_drawing, seed 2026 as tests/test_demo_default.py), greedy, through
the demo's Engine with the demo's prompts: the colour, size and shape asked in Chat, the colour asked as a follow-up
after the size, and the colour, size and shape named in a Caption. Prints one JSON object of counts. This is how the
README's figures for the embedded default (query vs global visual path) were measured.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path


def sense_counts(run: Path, pictures: int, seed: int = 2026) -> dict[str, int]:
    from app.engine import Engine, Turn
    from data.synthetic_mix import demo_drawing
    from model import load_run

    engine = Engine(load_run(run, device="cpu"))
    greedy = {"temperature": 0.0, "max_new_tokens": 24}
    rng = random.Random(seed)
    counts = dict.fromkeys(["chat colour", "chat size", "chat shape", "follow-up colour", "caption colour",
                            "caption size", "caption shape"], 0)  # fmt: skip

    def ask(history: list, message: str, image) -> str:
        return "".join(engine.chat(history, message, image, **greedy).pieces).strip()

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pictures):
            drawing = demo_drawing(rng)
            path = Path(tmp) / f"{i}.png"
            drawing.render(64).save(path)
            colour = ask([], "What color is the shape in the picture?", path)
            size = ask([], "Is the shape big or small?", path)
            shape = ask([], "What shape is it?", path)
            after = ask([Turn("Is the shape big or small?", size, str(path))], "What color is it?", None)
            words = "".join(engine.caption(path, **greedy).pieces).lower().rstrip(".").split()
            counts["chat colour"] += colour == f"The shape is {drawing.color}."
            counts["chat size"] += size == f"The shape is {drawing.size_word}."
            counts["chat shape"] += shape == f"It is a {drawing.shape}."
            counts["follow-up colour"] += after == f"The shape is {drawing.color}."
            counts["caption colour"] += drawing.color in words
            counts["caption size"] += drawing.size_word in words
            counts["caption shape"] += drawing.shape in words
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/demo_sense.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory of train.py --recipe demo")
    parser.add_argument("--pictures", type=int, default=24, help="fresh pictures (default: %(default)s)")
    args = parser.parse_args(argv)
    print(json.dumps({"run": str(args.run), "pictures": args.pictures, **sense_counts(args.run, args.pictures)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
