"""`pixellm chat`: a stdin loop of questions about an image, `/image` to switch, overlays saved."""

from __future__ import annotations

import io
import sys

from trained_tiny import OTHER_QUESTION, QUESTION, random_image

from pixellm.main import main


def test_chat_answers_two_turns_and_switches_image(exported_tiny, tmp_path, monkeypatch, capsys):
    random_image(5, (40, 30)).save(tmp_path / "first.png")
    random_image(6, (30, 40), "L").save(tmp_path / "second.png")
    lines = [QUESTION, "/image " + str(tmp_path / "missing.png"), "/image " + str(tmp_path / "second.png"),
             "/help", "what is <image>?", OTHER_QUESTION, "/quit", "never asked"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = tmp_path / "chat"
    main(["chat", "--model", str(exported_tiny), "--image", str(tmp_path / "first.png"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("A: the circle [1] and the square [2].") == 2
    assert "missing.png: image not found" in printed
    assert f"image: {tmp_path / 'second.png'}" in printed
    assert "unknown command /help" in printed
    assert "question must not contain '<image>'" in printed
    for folder in ("first_1", "second_2"):
        assert (out / folder / "overlay.png").is_file() and (out / folder / "mask_2.png").is_file()
        assert str(out / folder / "overlay.png") in printed
    assert sorted(p.name for p in out.iterdir()) == ["first_1", "second_2"]
