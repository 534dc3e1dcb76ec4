"""`pixellm predict --model DIR`: files per image, numbered answers, batch size independence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from trained_tiny import OTHER_QUESTION, QUESTION, random_image

from pixellm.data.images import open_rgb
from pixellm.export import load_pretrained
from pixellm.inference.answer import number_targets
from pixellm.inference.commands import read_jsonl
from pixellm.inference.overlay import ALPHA, LEGEND_ROW, target_colour
from pixellm.inference.predictor import Predictor, Request, mask_scores, resolve_dtype
from pixellm.inference.writers import OutputFolders
from pixellm.main import main, run_tool, tool_for
from pixellm.pretrained_cli import model_folder

TOKENS = [f"[SEG{i}]" for i in range(6)]
GROUP = " ".join(TOKENS)


def test_number_targets_replaces_each_complete_group_and_labels_it():
    answer = f"the cat {GROUP} and the big dog {GROUP}. [SEG0] [SEG1]"
    numbered = number_targets(answer, TOKENS)
    assert numbered.text == "the cat [1] and the big dog [2]."  # the incomplete group is dropped
    assert numbered.labels == ["the cat", "the big dog"]
    assert number_targets("there is no cat.", TOKENS).text == "there is no cat."
    # a group out of order makes no mask (drop_malformed_groups): [1] is the dog's, the one mask decoded
    broken = "the cat [SEG0] [SEG1] [SEG2] [SEG4] [SEG3] [SEG5] and the dog " + GROUP + " ."
    numbered = number_targets(broken, TOKENS)
    assert numbered.text == "the cat and the dog [1]." and numbered.labels == ["the cat and the dog"]


def test_output_folders_never_repeat_a_name(tmp_path):
    folders = OutputFolders(tmp_path)
    names = [folders.next(Path(n).stem).name for n in ["x.png", "x.jpg", "x_2.png", "y.png", "x.gif", ".png"]]
    assert names == ["x", "x_2", "x_2_2", "y", "x_3", "png"]
    assert folders.next("photo.v2_1").name == "photo.v2_1"  # chat's <stem>_<turn>, kept whole


@pytest.mark.parametrize("stem", ["..", ".", "", " ", "../up", "a/../../b"])
def test_output_folders_stay_inside_their_root(tmp_path, stem):
    root = tmp_path / "out"
    folder = OutputFolders(root).next(stem)
    assert folder.parent == root and folder.name not in ("", ".", "..") and "/" not in folder.name


def test_a_second_run_never_writes_into_the_first_runs_folders(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mask_2.png").write_bytes(b"from the first run")
    assert OutputFolders(tmp_path).next("x").name == "x_2"


def test_mask_scores_are_the_mean_probability_inside_each_mask():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 1.0]], [[-1.0, -2.0], [-3.0, -4.0]]])  # (2, 2, 2)
    expected = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(1.0))) / 2
    assert torch.allclose(mask_scores(logits), torch.stack([expected, torch.tensor(0.0)]), atol=1e-6)


@pytest.fixture
def three_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    random_image(1, (40, 30), "RGB").save(folder / "a_rgb.png")
    random_image(2, (24, 36), "L").save(folder / "b_gray.png")
    random_image(3, (33, 33), "RGBA").save(folder / "c_rgba.png")
    (folder / "d_broken.png").write_bytes(b"not a png")
    return folder


def test_predict_writes_answer_masks_overlay_and_rle_for_every_image(exported_tiny, three_images, tmp_path, capsys):
    out = tmp_path / "out"
    main(["predict", "--model", str(exported_tiny), "--image", str(three_images), "--question", QUESTION,
          "--out", str(out), "--batch-size", "2"])
    printed = capsys.readouterr()
    assert "wrote 3 predictions" in printed.out
    assert "skipped 1 unreadable images" in printed.err and "d_broken.png: not a readable image" in printed.err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["folder"] for r in records] == [str(out / s) for s in ("a_rgb", "b_gray", "c_rgba")]
    for record, name in zip(records, ("a_rgb", "b_gray", "c_rgba"), strict=True):
        folder = out / name
        image = open_rgb(three_images / f"{name}.png")  # as predict reads it (RGBA over the mean colour)
        assert (folder / "answer.txt").read_text() == f"Q: {QUESTION}\nA: the circle [1] and the square [2].\n"
        saved = json.loads((folder / "masks.json").read_text())
        assert saved == {k: v for k, v in record.items() if k != "folder"}
        assert (saved["width"], saved["height"]) == image.size
        assert [a["label"] for a in saved["annotations"]] == ["the circle", "the square"]
        masks = []
        for annotation in saved["annotations"]:
            png = np.asarray(Image.open(folder / f"mask_{annotation['id']}.png"))
            assert png.shape == (image.height, image.width) and set(np.unique(png)) <= {0, 255}
            rle = {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_utils.decode(rle) * 255, png)
            assert annotation["area"] == int((png > 0).sum()) and 0.0 < annotation["score"] <= 1.0
            masks.append(png > 0)
        overlay = np.asarray(Image.open(folder / "overlay.png")).astype(float)
        assert overlay.shape[0] == image.height + 2 * LEGEND_ROW
        expected = np.asarray(image).astype(float)
        away_from_numbers = np.ones(masks[0].shape, dtype=bool)
        for k, mask in enumerate(masks):
            expected[mask] = (1 - ALPHA) * expected[mask] + ALPHA * np.array(target_colour(k))
            ys, xs = np.nonzero(mask)
            y, x = int(ys.mean()), int(xs.mean())
            away_from_numbers[max(0, y - 8) : y + 9, max(0, x - 8) : x + 9] = False
        drawn = overlay[: image.height, : image.width]
        assert np.abs(drawn[away_from_numbers] - expected[away_from_numbers]).max() <= 1
        assert away_from_numbers.mean() > 0.3 and (masks[0] & masks[1] & away_from_numbers).any()
        legend = overlay[image.height :]
        assert (legend == np.array(target_colour(0))).all(-1).any() and (legend == np.array(target_colour(1))).all(-1).any()


def test_batched_prediction_equals_one_at_a_time(exported_tiny):
    model = load_pretrained(exported_tiny)
    requests = [
        Request(random_image(10 + i, size, mode), question)
        for i, (size, mode, question) in enumerate(
            [((40, 30), "RGB", QUESTION), ((20, 36), "L", OTHER_QUESTION), ((32, 32), "RGBA", QUESTION)]
        )
    ]
    batched = Predictor(model, batch_size=3).predict(requests)
    single = [Predictor(model, batch_size=1).predict([r])[0] for r in requests]
    for a, b in zip(batched, single, strict=True):
        assert a.text == b.text and a.masks.shape[0] == 2
        assert torch.equal(a.masks, b.masks)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)


def test_precision_is_fp32_on_cpu_and_half_precision_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="precision bf16 needs a GPU"):
        resolve_dtype("bf16", cpu)
    with pytest.raises(ValueError, match="precision must be auto"):
        resolve_dtype("int3", cpu)


@pytest.mark.parametrize("option", ["--batch-size", "--max-new-tokens"])
def test_counts_below_one_are_refused_before_loading_a_model(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:  # the folder does not even exist: nothing was loaded
        main(["predict", "--model", str(tmp_path / "none"), "--image", "x.png", "--question", "q", option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_jsonl_requests_resolve_relative_paths_and_name_bad_lines(tmp_path):
    random_image(0).save(tmp_path / "x.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "x.png", "question": "q?"}) + "\n\n")
    assert read_jsonl(good) == [(tmp_path / "x.png", "q?")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "question": "q?"}) + "\n" + json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: field 'question'"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"image": "missing.png", "question": "q?"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"line 1: field 'image': .*missing.png does not exist"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"image": ".", "question": "q?"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"line 1: field 'image': .* is not a file"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"image": "x.png", "question": "what is in <image>?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: field 'question': holds '<image>'"):
        read_jsonl(bad)


def test_predict_with_a_config_stays_lightnings_and_tools_are_found_by_name(exported_tiny):
    assert tool_for(["predict", "--config", "c.yaml", "--ckpt_path", "x"]) is None
    assert tool_for(["predict", "--model", "pixellm.task.PixelLMTask"]) is None
    for model in (["--model", str(exported_tiny)], [f"--model={exported_tiny}"]):  # the folder tool says what is missing
        assert tool_for(["predict", *model, "--question", "q?"]) == "pixellm.inference.commands:predict_command"
        for lightning in (["--config", "c.yaml"], ["-c", "c.yaml"], ["--data", "d.yaml"], ["--data.init_args.x=1"],
                          ["--trainer.devices=1"]):
            assert tool_for(["predict", *lightning, *model]) is None
    assert tool_for(["predict", "--model", str(exported_tiny), "--jsonl", "q.jsonl"]) == "pixellm.inference.commands:predict_command"
    assert model_folder(["validate", "--config", "c.yaml", f"--model={exported_tiny}"]) == (exported_tiny, 3)
    assert model_folder(["validate", "--model", "pixellm.task.PixelLMTask"]) is None
    assert tool_for(["fit", "--config", "c.yaml"]) is None
    assert tool_for(["predict", "--model", "DIR", "--image=x.png"]) == "pixellm.inference.commands:predict_command"
    assert tool_for(["convert-refs", "a"]) == "pixellm.data.refer:convert_refs_command"
    with pytest.raises(SystemExit, match="needs pixellm.no_such_module, which is not installed"):
        run_tool("pixellm.no_such_module:command", [])
