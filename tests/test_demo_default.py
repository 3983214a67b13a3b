"""The embedded default (`make train`: ``train.py --recipe demo``) makes sense in every face of the demo. Trained on
the synthetic demo mix, it names the colour and size of pictures it never saw in Chat, Caption and Answer, through
the served app and gradio_client; it scores the ScienceQA table and the captions; the UI's examples are answered
right."""

import json
import random
from contextlib import closing

import pytest
from gradio_client import Client, handle_file

import train
from data.synthetic_mix import demo_drawing, ensure_mix

pytestmark = pytest.mark.early  # minutes of training: started first, so that the other worker runs the rest meanwhile

GREEDY = (0.0, 0.75, 24)  # temperature, top_p, max_new_tokens
N_PICTURES = 12
"""Fresh pictures the served model is asked about (drawn with a seed the training data never used)."""
AT_LEAST = 10
"""Right answers required of N_PICTURES: of 24 pictures, measured on 2026-12-07 (the query visual path, seeds 0 and
1), chat named 24 colours, captions 23 or 24, a colour follow-up after the size 24, and every size; the margin
covers a different machine's floating-point sums changing a few greedy choices."""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe trained (with its evaluation) on the demo mix generated in a temporary folder (train.py
    generates it only at its own place)."""
    tmp = tmp_path_factory.mktemp("demo")
    ensure_mix(tmp / "mix")
    argv = ["--recipe", "demo", "--data", str(tmp / "mix"), "--run.progress", "false", "--run.out", str(tmp / "run")]
    assert train.main(argv) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def served(demo_run, tmp_path_factory):
    """`python -m app --checkpoint RUN` on a free local port: the engine and the URL."""
    from app.__main__ import build_parser, load_engine
    from app.ui import build_demo, launch

    engine = load_engine(build_parser().parse_args(["--checkpoint", str(demo_run), "--device", "cpu"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = build_demo(engine)
        _, url, _ = launch(demo, port=None, prevent_thread_lock=True, quiet=True)
        yield engine, url
        demo.close()


@pytest.mark.slow
def test_the_demo_run_reports_the_scienceqa_table_and_caption_scores(demo_run):
    sqa = json.loads((demo_run / "metrics.json").read_text())
    assert sqa["IMG"] >= 70.0, sqa  # 92.21 measured on one thread (--run.seed 1: 83.77); chance ~36
    coco = json.loads((demo_run / "coco" / "metrics.json").read_text())  # percent: CIDEr 631.33, BLEU-4 75.62
    assert coco["images"] == 100 and coco["CIDEr"] >= 200.0 and coco["Bleu_4"] >= 40.0, coco


LONG_CONVERSATION = (
    "What color is the shape in the picture?",
    "Is the shape big or small?",
    "What color is it?",
    "Is it big or small?",
    "Describe the picture.",
)
"""Five turns about one picture, attached to the first; the demo mix has conversations of one to three. Measured on
2026-12-07 (the query visual path, one thread), of 12 pictures turn 3 named the colour 12 times, turn 4 the size 9,
turn 5's description both 2 (`make train`'s run, 24 pictures: 22, 10 and 8). Turn 3 must be right as often as the
first two; turns 4 and 5 are measured only, and no turn may run on into the prompt template's text (which the chat
showed as Markdown headings before replies stopped at "###")."""
TEMPLATE_TEXT = ("###", "Instruction:", "Response:", "Input:", "User:")


@pytest.mark.slow
def test_chat_caption_and_answer_name_what_a_new_picture_shows(served, tmp_path):
    """gradio_client, as a user's script calls the demo: per picture two conversations (five turns from colour and
    size to a description, the image only with the first; size, then colour), a caption, and a question with
    choices."""
    _, url = served
    rng = random.Random(2026)
    right = dict.fromkeys(
        ["chat colour", "chat size", "follow-up size", "follow-up colour", "caption colour", "caption size",
         "answer colour", "turn 3 colour", "turn 4 size", "turn 5 colour and size"], 0,
    )  # fmt: skip
    replies = []
    client = Client(url, verbose=False)

    def conversation(path, first: str, *then: str) -> list[str]:
        """The replies to ``first`` (with the picture) and to each of ``then`` in a new conversation."""
        client.reset_session()  # a new session: a new conversation
        answers = [client.predict({"text": first, "files": [handle_file(path)]}, *GREEDY, api_name="/chat")]
        return answers + [client.predict({"text": text, "files": []}, *GREEDY, api_name="/chat") for text in then]

    with closing(client):
        for i in range(N_PICTURES):
            drawing = demo_drawing(rng)
            path = tmp_path / f"{i}.png"
            drawing.render(64).save(path)
            long_talk = conversation(path, *LONG_CONVERSATION)
            size, colour_after = conversation(path, "Is the shape big or small?", "What color is it?")
            caption = client.predict(handle_file(path), *GREEDY, api_name="/caption")
            options = "red\ngreen\nblue\nyellow"
            question = "What color is the shape in the picture?"
            choice = client.predict(handle_file(path), question, "", options, *GREEDY, api_name="/answer")
            replies.append((drawing, long_talk, size, colour_after, caption, choice))
    for drawing, long_talk, size, colour_after, caption, choice in replies:
        colour, size_after, colour_third, size_fourth, description = long_talk
        words = caption.lower().rstrip(".").split()
        right["chat colour"] += colour == f"The shape is {drawing.color}."
        right["chat size"] += size == f"The shape is {drawing.size_word}."
        right["follow-up size"] += size_after == f"The shape is {drawing.size_word}."
        right["follow-up colour"] += colour_after == f"The shape is {drawing.color}."
        right["caption colour"] += drawing.color in words
        right["caption size"] += drawing.size_word in words
        right["answer colour"] += choice.endswith(f") {drawing.color}")
        right["turn 3 colour"] += colour_third == f"The shape is {drawing.color}."
        right["turn 4 size"] += size_fourth == f"The shape is {drawing.size_word}."
        described = description.lower()
        right["turn 5 colour and size"] += drawing.color in described and drawing.size_word in described
    template = [r for _, talk, *others in replies for r in [*talk, *others] if any(t in r for t in TEMPLATE_TEXT)]
    assert not template, template
    measured_only = ("turn 4 size", "turn 5 colour and size")
    assert all(n >= AT_LEAST for key, n in right.items() if key not in measured_only), (right, replies)


@pytest.mark.slow
def test_the_uis_examples_are_answered_right(served):
    """What the app shows a new user after `make train`: its note, and right answers to its examples."""
    from app.__main__ import EMBEDDED_DEFAULT_NOTE
    from app.ui import CHAT_EXAMPLES, IMAGE_EXAMPLES

    engine, _ = served
    assert engine.about == EMBEDDED_DEFAULT_NOTE
    greedy = {"temperature": 0.0, "max_new_tokens": 24}
    chats = ["".join(engine.chat([], ex["text"], (ex.get("files") or [None])[0], **greedy)) for ex in CHAT_EXAMPLES]
    assert chats[:2] == ["The shape is red.", "The shape is small."]  # a big red circle, a small green square
    assert chats[2].startswith("Alpacas are")
    answers = ["".join(engine.answer(q, image, context, choices.split("\n"), **greedy))
               for image, q, context, choices in IMAGE_EXAMPLES]  # fmt: skip
    assert answers == ["The answer is (A) red", "The answer is (B) small"]
