"""``pixellm predict --model DIR`` and ``pixellm chat --model DIR``: an exported folder on your images.

    pixellm predict --model models/shapes --image photos/ --question "segment every circle." --out preds
    pixellm predict --model models/shapes --jsonl questions.jsonl --out preds --batch-size 8
    pixellm chat --model models/shapes --image photo.png

A JSONL file holds one ``{"image": PATH, "question": TEXT}`` per line; relative paths are read from
the JSONL's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pixellm.data.images import open_rgb
from pixellm.inference.chat import chat_loop
from pixellm.inference.predictor import Predictor, Request
from pixellm.inference.writers import OutputFolders, write_prediction
from pixellm.tokenizer import IMAGE_TOKEN

IMAGE_NOTE = f"holds {IMAGE_TOKEN!r}, which marks where the image goes; the image is placed for you"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, refused before any model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that load an exported folder."""
    parser.add_argument("--model", required=True, help="folder written by `pixellm export`")
    parser.add_argument("--base-model", help="local LLaVA folder (when the folder keeps base weights out)")
    parser.add_argument("--vision-model", help="local CLIP folder (frozen pretrained vision tower)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 (else fp16) on GPU, fp32 on CPU")
    parser.add_argument("--quantize", choices=["8bit", "4bit"], help="LLM weights via bitsandbytes (optional extra)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="answer length limit (default: the folder's)")


def load_predictor(args: argparse.Namespace, batch_size: int = 1) -> Predictor:
    return Predictor.from_folder(
        args.model, base_model=args.base_model, vision_model=args.vision_model, device=args.device,
        precision=args.precision, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
        quantize=args.quantize,
    )


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the image files of a folder in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def read_jsonl(path: Path) -> list[tuple[Path, str]]:
    """(image path, question) pairs of a JSONL file; errors name the line and the field."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err})") from err
        for name in ("image", "question"):
            if not isinstance(record, dict) or not isinstance(record.get(name), str) or not record[name].strip():
                raise ValueError(f"{path} line {number}: field {name!r} must be a non-empty string")
        if IMAGE_TOKEN in record["question"]:
            raise ValueError(f"{path} line {number}: field 'question': {IMAGE_NOTE}")
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            problem = "is not a file" if image.exists() else "does not exist"
            raise FileNotFoundError(f"{path} line {number}: field 'image': {image} {problem}")
        pairs.append((image, record["question"]))
    if not pairs:
        raise ValueError(f"{path}: no requests")
    return pairs


def _requests(pairs: list[tuple[Path, str]], skipped: list[str]) -> Iterator[Request]:
    """Requests of readable images; the error of each unreadable one is appended to ``skipped``."""
    for image, question in pairs:
        try:
            picture = open_rgb(image)
        except ValueError as err:
            skipped.append(str(err))
            continue
        yield Request(image=picture, question=question, source=str(image))


def predict_command(argv: list[str]) -> None:
    """Run ``pixellm predict --model DIR ...`` with the arguments after the sub-command."""
    parser = argparse.ArgumentParser(prog="pixellm predict", description="answer and segment images")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="an image or a folder of images")
    source.add_argument("--jsonl", type=Path, help="JSONL of {image, question} records")
    parser.add_argument("--question", help="the question asked about every --image")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="requests per forward pass")
    args = parser.parse_args(argv)
    if args.image is not None:
        if not (args.question or "").strip():
            parser.error("--image needs --question (not blank)")
        if IMAGE_TOKEN in args.question:
            parser.error(f"--question: {IMAGE_NOTE}")
        pairs = [(path, args.question) for path in image_files(args.image)]
    else:
        pairs = read_jsonl(args.jsonl)
    predictor = load_predictor(args, args.batch_size)
    folders = OutputFolders(args.out)
    skipped: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (args.out / "predictions.jsonl").open("a") as summary, Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("predict", total=len(pairs))
        written = 0
        for prediction in predictor.predict_all(_requests(pairs, skipped)):
            folder = folders.next(Path(prediction.request.source).stem)
            record = write_prediction(prediction, folder)
            summary.write(json.dumps({**record, "folder": str(folder)}) + "\n")
            written += 1
            bar.update(task, completed=written + len(skipped))
        bar.update(task, completed=len(pairs))
    print(f"wrote {written} predictions to {args.out}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images:", *skipped, sep="\n  ", file=sys.stderr)


def chat_command(argv: list[str]) -> None:
    """Run ``pixellm chat --model DIR --image PATH`` reading questions from standard input."""
    parser = argparse.ArgumentParser(prog="pixellm chat", description="talk about an image")
    add_model_arguments(parser)
    parser.add_argument("--image", type=Path, required=True, help="the image to talk about")
    parser.add_argument("--out", type=Path, default=Path("chat"), help="folder of the overlays")
    args = parser.parse_args(argv)
    image = open_rgb(args.image)
    chat_loop(load_predictor(args), image, str(args.image), args.out, sys.stdin, sys.stdout)
