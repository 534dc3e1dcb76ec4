"""The ``pixellm chat`` loop: questions from a text stream, answers and overlays as they come.

Lines are questions about the current image; earlier turns about it are passed as history.
``/image PATH`` switches image (and starts a new history), ``/quit`` or the end of input ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from PIL import Image

from pixellm.data.images import open_rgb
from pixellm.inference.predictor import Predictor, Request
from pixellm.inference.writers import OutputFolders, write_prediction

HELP = "ask a question; /image PATH switches image; /quit ends"


def chat_loop(
    predictor: Predictor, image: Image.Image, source: str, out: Path, lines: TextIO, output: TextIO
) -> int:
    """Answer each line of ``lines``, write its files under ``out``; returns the turns answered.

    Args:
        predictor: the loaded model.
        image: the first image.
        source: its path (names the output folders).
        out: folder of the per-turn outputs (``<image stem>_<turn>/overlay.png`` ...).
        lines: questions and commands, one per line (e.g. standard input).
        output: where prompts, answers and file paths are printed.
    """
    folders = OutputFolders(out)
    history: list[tuple[str, str]] = []
    turns = 0
    print(f"pixellm chat on {source}: {HELP}", file=output, flush=True)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                image, source, history = open_rgb(Path(path).expanduser()), path, []
            except (FileNotFoundError, ValueError) as err:
                print(f"! {err}", file=output, flush=True)
                continue
            print(f"image: {source}", file=output, flush=True)
            continue
        if text.startswith("/"):
            print(f"! unknown command {text.split()[0]}: {HELP}", file=output, flush=True)
            continue
        request = Request(image=image, question=text, source=source, history=list(history))
        try:
            prediction = predictor.predict([request])[0]
        except ValueError as err:  # e.g. a question holding the image token
            print(f"! {err}", file=output, flush=True)
            continue
        folder = folders.next(f"{Path(source).stem}_{turns + 1}")
        write_prediction(prediction, folder)
        history.append((text, prediction.text))
        turns += 1
        print(f"A: {prediction.text}", file=output, flush=True)
        print(f"   {len(prediction.labels)} masks, overlay: {folder / 'overlay.png'}", file=output, flush=True)
    return turns
