"""report.py: the table and plot of PPO runs (seeds of one experiment on one row, verdicts, steps to a threshold)."""

import importlib.util
import json

import pytest

import report


def write_run(folder, config, rows):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_table_uses_first_and_last_ten_steps(tmp_path):
    rows = [{"step": i, "reward/success": i / 20, "response/length": 20 + i, "response/steps": 4 + (i >= 15),
             "response/truncated": 0.5 * (i >= 18), "time/step": 3.0, "other": 1} for i in range(1, 21)]
    write_run(tmp_path / "prm_a1", {"reward": "prm", "alpha": 1.0}, rows)
    write_run(tmp_path / "success", {"reward": "success", "alpha": 1.0}, rows[:5])
    table = report.report([tmp_path / "prm_a1", tmp_path / "success"], out=None)
    lines = table.splitlines()
    assert lines[0] == ("| run | reward | alpha | advantage | seeds | PPO steps | minutes | success "
                        "| steps per response | length (tokens) | truncated | mean success | steps to 0.5 | verdict |")
    # first ten steps 1..10: success mean 5.5/20 = 0.275, length 25.5, steps 4, truncated 0;
    # last ten steps 11..20: success 15.5/20 = 0.775, length 35.5, steps 4.6, truncated 0.15.
    # 20 steps of 3 s: 1.0 minute. A run without "advantage" in its config predates the flag: gae; without
    # "seed", seed 0. The 10-step mean success first reaches 0.5 at step 15 (steps 6..15: 105/200 = 0.525;
    # step 14: 0.475); its mean success over all steps is 210/400. Against `success` (end 0.15) prm ends higher
    # and its steps grow by 0.6 <= 1.0: it holds.
    assert lines[2] == ("| prm_a1 | prm | 1 | gae | 0 | 20 | 1.0 | 0.28 -> 0.78 | 4.0 -> 4.6 | 25.5 -> 35.5 "
                        "| 0.00 -> 0.15 | 0.525 | 15 | holds |")
    # a run shorter than ten steps: both windows cover all of it, and no full window reaches 0.5; alpha is not
    # shown for success only.
    assert lines[3] == ("| success | success | - | gae | 0 | 5 | 0.2 | 0.15 -> 0.15 | 4.0 -> 4.0 | 23.0 -> 23.0 "
                        "| 0.00 -> 0.00 | 0.150 | not reached | - |")

    out = tmp_path / "out" / "table.md"
    report.main(["table", str(tmp_path / "prm_a1"), "--out", str(out), "--threshold", "0.75"])
    # without a `success` run there is nothing to judge against; 0.75 is first reached at step 20 (0.775)
    alone = lines[2].replace("| 15 | holds |", "| 20 | - |")
    assert out.read_text() == "\n".join([lines[0].replace("0.5", "0.75"), lines[1], alone]) + "\n"


def test_first_step_reaching_a_threshold_uses_full_trailing_windows():
    rows = [{"step": i, "reward/success": float(i > 10)} for i in range(1, 31)]
    assert report.first_step_reaching(rows, 0.5) == 15   # the docstring's example: steps 6-15 hold five ones
    assert report.first_step_reaching(rows, 1.0) == 20
    assert report.first_step_reaching(rows, 0.0) == 10   # the first full window, not step 1
    assert report.first_step_reaching(rows[:9], 0.0) is None
    assert report.first_step_reaching(rows, 1.01) is None


def test_report_aggregates_seeds_mean_spread_and_steps_to_threshold(tmp_path):
    def run(name, reward, seed, success, advantage="gae", lr=3e-5):
        rows = [{"step": i, "reward/success": success(i), "response/length": 30 + seed, "response/steps": 5,
                 "response/truncated": 0.0, "time/step": 6.0} for i in range(1, 31)]
        write_run(tmp_path / name, {"reward": reward, "alpha": 1.0, "advantage": advantage, "seed": seed,
                                    "output_dir": f"runs/{name}", "policy_lr": lr}, rows)
        return tmp_path / name
    runs = [run("success-gae-s0", "success", 0, lambda i: 0.2),
            run("clip_delta-gae-s0", "clip_delta", 0, lambda i: 0.2 + 0.6 * (i > 10)),
            run("success-gae-s1", "success", 1, lambda i: 0.4),
            run("clip_delta-gae-s1", "clip_delta", 1, lambda i: 0.2 + 0.6 * (i > 20)),
            run("clip_delta-gae-s2", "clip_delta", 2, lambda i: 0.2 + 0.3 * (i > 5)),
            run("clip_delta-lr-s0", "clip_delta", 0, lambda i: 0.2, lr=1e-4)]  # another experiment: its own row
    lines = report.report(runs, out=None).splitlines()[2:]
    assert len(lines) == 3
    # success: seeds 0 and 1 end at 0.2 and 0.4: mean 0.30, sample std 0.14; never reaches 0.5.
    assert lines[0] == ("| success-gae | success | - | gae | 0, 1 | 30 | 3.0 | 0.30 -> 0.30 +- 0.14 | 5.0 -> 5.0 "
                        "| 30.5 -> 30.5 | 0.00 -> 0.00 | 0.300 | 0 of 2 (not reached, not reached) | - |")
    # clip_delta: starts 0.2, 0.2, (5 x 0.2 + 5 x 0.5) / 10 = 0.35 -> mean 0.25; ends 0.8, 0.8, 0.5 -> mean 0.70,
    # sample std 0.17. Reaches 0.5 at step 15 (seed 0: 0.2*5 + 0.8*5 = 5.0) and 25 (seed 1); seed 2 plateaus at
    # 0.5 from step 15 (0.5 >= 0.5). Mean success over the 30 steps: 18/30, 12/30, 13.5/30 -> 0.483.
    # 0.70 - 0.30 above success: holds.
    assert lines[1] == ("| clip_delta-gae | clip_delta | 1 | gae | 0, 1, 2 | 30 | 3.0 | 0.25 -> 0.70 +- 0.17 "
                        "| 5.0 -> 5.0 | 31.0 -> 31.0 | 0.00 -> 0.00 | 0.483 | 18 (15, 25, 15) | holds |")
    # no success run at lr 1e-4 to judge against (gae's success ran at 3e-5)
    assert lines[2] == ("| clip_delta-lr-s0 | clip_delta | 1 | gae | 0 | 30 | 3.0 | 0.20 -> 0.20 | 5.0 -> 5.0 "
                        "| 30.0 -> 30.0 | 0.00 -> 0.00 | 0.200 | not reached | - |")

    # A rerun of a seed is shown beside the first run, not averaged with it.
    (tmp_path / "copy").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / "copy" / name).write_text((runs[0] / name).read_text())
    lines = report.report([runs[0], tmp_path / "copy"], out=None).splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == ["| success-gae-s0", "| copy"]


def test_report_groups_toy_seeds_cuts_to_common_steps_and_plots_the_spread(tmp_path, capsys):
    """`--preset toy --seed N` warms up per seed (the folder names differ only there): still one experiment.
    A seed that stopped early cuts the others to its steps, with a note."""
    def run(name, seed, steps, success):
        rows = [{"step": i, "reward/success": success + 0.4 * (i > 12), "response/length": 30, "response/steps": 4,
                 "response/truncated": 0.0} for i in range(1, steps + 1)]
        write_run(tmp_path / name, {"reward": "clip", "alpha": 1.0, "seed": seed, "cache_dir": f"/c{seed}",
                                    "model": f"/c{seed}/toy/warm-seed{seed}-0123abcd"}, rows)
        return tmp_path / name
    runs = [run("clip-s0", 0, 30, 0.5), run("clip-s1", 1, 12, 0.7), run("other", 2, 30, 0.1)]
    (tmp_path / "other" / "config.json").write_text(json.dumps(
        {"reward": "clip", "alpha": 1.0, "seed": 2, "model": "/c/toy/warm-seed2-ffff0000"}))  # another world
    lines = report.report(runs, out=tmp_path / "table.md").splitlines()[2:]
    assert [line.split(" | ")[:6] for line in lines] == [
        ["| clip", "clip", "1", "gae", "0, 1", "12"], ["| other", "clip", "1", "gae", "2", "30"]]
    assert lines[0].split(" | ")[7] == "0.60 -> 0.60 +- 0.14"  # steps 3-12 of seed 0 (0.5), not 21-30 (0.9)
    assert "clip: its seeds ran [12, 30] steps; all are cut to the first 12" in capsys.readouterr().err
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_verdict_compares_with_success_under_the_same_estimator(tmp_path):
    def run(name, reward, advantage, success, steps_end):
        rows = [{"step": i, "reward/success": success, "response/length": 30, "response/steps": 4 + steps_end * (i > 10),
                 "response/truncated": 0.0} for i in range(1, 21)]
        write_run(tmp_path / name, {"reward": reward, "alpha": 1.0, "advantage": advantage}, rows)
        return tmp_path / name
    runs = [run("s_gae", "success", "gae", 0.8, 0), run("s_grpo", "success", "grpo", 0.5, 0),
            run("prm_gae", "prm", "gae", 0.6, 3.0),     # 0.2 below gae's success and steps +3: fails twice
            run("clip_gae", "clip", "gae", 0.75, 0.5),  # 0.05 below, steps +0.5: holds
            run("prm_grpo", "prm", "grpo", 0.6, 0),     # above grpo's success (0.5), not gae's: holds
            run("delta_grpo", "delta", "grpo", 0.35, 1.5),  # 0.15 below, steps +1.5
            run("clip_rloo", "clip", "rloo", 0.1, 2.0)]     # no success run under rloo: steps only
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in report.report(runs, out=None).splitlines()[2:]]
    assert verdicts == ["-", "-", "fails: success -0.20, steps +3.0", "holds", "holds",
                        "fails: success -0.15, steps +1.5", "fails: steps +2.0"]


def test_report_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(SystemExit, match="config.json not found"):
        report.report([tmp_path], out=None)
    (tmp_path / "config.json").write_text(json.dumps({"reward": "prm"}))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="config.json has no 'alpha'"):
        report.report([tmp_path], out=None)
    (tmp_path / "config.json").write_text(json.dumps({"reward": "prm", "alpha": 1}))
    row = {"step": 1, "reward/success": 0, "response/length": 1, "response/steps": 1, "response/truncated": 0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(SystemExit, match="metrics.jsonl line 2"):
        report.report([tmp_path], out=None)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(SystemExit, match="line 1 lacks"):
        report.report([tmp_path], out=None)


def test_report_plot_is_written_beside_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": i, "reward/success": 0.5, "response/length": 30, "response/steps": 4,
             "response/truncated": 0.0} for i in range(1, 4)]
    write_run(tmp_path / "clip", {"reward": "clip", "alpha": 1.0}, rows)
    write_run(tmp_path / "clip_grpo", {"reward": "clip", "alpha": 1.0, "advantage": "grpo"}, rows)
    report.report([tmp_path / "clip", tmp_path / "clip_grpo"], out=tmp_path / "ablation.md")  # two rows of panels
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
