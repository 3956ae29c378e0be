"""bench/eval_throughput.py stays runnable: its --quick path runs end to end (no timing is asserted).

In this process rather than a subprocess: the scoring models are then loaded once for
all evaluation tests."""
import json

from bench.eval_throughput import main


def test_eval_throughput_quick(tmp_path, capsys):
    main(["--quick", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| measure | images | images/s | x ceiling |" in out
    for name in ("raw image forward", "embed_images", "raw subject forward", "embed_subject"):
        assert f"| {name} |" in out
    assert "x its raw forward in images/s (" in out  # the goal's verdict is printed
    result = json.loads((tmp_path / "r.json").read_text())
    assert all(r > 0 for rates in result["images_per_s"].values() for r in rates)
