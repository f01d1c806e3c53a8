"""``gsrl compare``: pairing two eval reports by episode key, McNemar's exact test, and refusing unpaired reports."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from gsrl.cli import main as gsrl_main
from gsrl.compare import CompareError, binomial_two_sided_p, compare, main

PROTOCOL = {"task": "T", "seed": 7, "num_envs": 2, "layouts": "held-out", "layout_pool": 0, "deterministic": True}


def write_report(
    path: Path,
    successes: dict[tuple[int, int], bool],
    shuffle_seed: int | None = None,
    at_end: dict[tuple[int, int], bool] | None = None,
    **protocol,
):
    """A gsrl eval --json report whose episodes ended in a shuffled order (as different policies' episodes do);
    ``at_end``: each episode's success at its last step (default: ``successes``, as without ignore_terminations)."""
    keys = sorted(successes)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(keys)
    at_end = successes if at_end is None else at_end
    result = {
        "episodes": len(keys),
        "episode_success_once": [successes[k] for k in keys],
        "episode_success_at_end": [at_end[k] for k in keys],
        "episode_envs": [k[0] for k in keys],
        "episode_numbers": [k[1] for k in keys],
    }
    path.write_text(json.dumps({**PROTOCOL, **protocol, "result": result}))
    return path


def episodes(pattern: str) -> dict[tuple[int, int], bool]:
    """'1100...' -> env i = index % 2, number = index // 2, success per character."""
    return {(i % 2, i // 2): c == "1" for i, c in enumerate(pattern)}


def test_episodes_are_paired_by_key_not_by_the_order_they_ended(tmp_path: Path) -> None:
    base = episodes("1100110000")  # 4 of 10
    new = episodes("1011111100")  # 7 of 10: episodes 1 lost, 2, 3, 6, 7 gained
    result = compare(
        [write_report(tmp_path / "b.json", base)], [write_report(tmp_path / "n.json", new, shuffle_seed=1)]
    )
    assert (result.episodes, result.base_successes, result.new_successes) == (10, 4, 7)
    assert (result.new_only, result.base_only) == (4, 1)
    assert result.difference == pytest.approx(0.3)
    low, high = result.difference_ci95()
    assert low < 0.3 < high
    # Paired position by position, this shuffle would give 5 and 2: the order the episodes ended carries no pairing.
    assert result.mcnemar_p() == pytest.approx(binomial_two_sided_p(4, 5))


def test_several_report_pairs_pool_their_episodes(tmp_path: Path) -> None:
    first = compare(
        [write_report(tmp_path / "b1.json", episodes("1000"))], [write_report(tmp_path / "n1.json", episodes("1110"))]
    )
    both = compare(
        [
            write_report(tmp_path / "b1.json", episodes("1000")),
            write_report(tmp_path / "b2.json", episodes("01"), seed=8),
        ],
        [
            write_report(tmp_path / "n1.json", episodes("1110")),
            write_report(tmp_path / "n2.json", episodes("11"), seed=8),
        ],
    )
    assert (first.episodes, first.new_only) == (4, 2)
    assert (both.episodes, both.base_successes, both.new_successes, both.new_only, both.base_only) == (6, 2, 5, 3, 0)


def test_mcnemar_exact_p_values() -> None:
    # 8 of 9 discordant episodes one way: 2 * (C(9,0) + C(9,1)) / 2^9.
    assert binomial_two_sided_p(8, 9) == pytest.approx(2 * 10 / 512)
    assert binomial_two_sided_p(1, 9) == binomial_two_sided_p(8, 9)  # symmetric
    assert binomial_two_sided_p(3, 6) == 1.0 and binomial_two_sided_p(0, 0) == 1.0
    # Large counts agree with the normal approximation's order of magnitude.
    z = (88 - 45) / math.sqrt(133)
    assert binomial_two_sided_p(88, 133) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 8), ("num_envs", 4), ("layouts", "pool"), ("deterministic", False), ("ignore_terminations", True)],
)
def test_reports_of_other_episodes_are_refused_naming_what_differs(tmp_path: Path, field: str, value: object) -> None:
    base = write_report(tmp_path / "b.json", episodes("1100"))
    new = write_report(tmp_path / "n.json", episodes("1100"), **{field: value})
    with pytest.raises(CompareError, match=field):
        compare([base], [new])


def test_success_at_the_end_pairs_the_last_steps_and_old_reports_count_as_terminating(tmp_path: Path) -> None:
    """Reports of gsrl eval --ignore-terminations: --metric success_at_end pairs what each episode ended with. A report
    written before ignore_terminations was recorded ran with terminations, so it pairs with one that says False."""
    ignored = {"ignore_terminations": True}
    base = write_report(tmp_path / "b.json", episodes("1100"), at_end=episodes("1000"), **ignored)
    new = write_report(tmp_path / "n.json", episodes("1110"), at_end=episodes("0110"), **ignored)
    once = compare([base], [new])
    assert (once.base_successes, once.new_successes, once.new_only, once.base_only) == (2, 3, 1, 0)
    at_end = compare([base], [new], metric="success_at_end")
    assert (at_end.base_successes, at_end.new_successes, at_end.new_only, at_end.base_only) == (1, 2, 2, 1)
    with pytest.raises(CompareError, match="unknown metric 'success'"):
        compare([base], [new], metric="success")

    older = tmp_path / "older.json"
    report = json.loads(write_report(older, episodes("1100")).read_text())
    assert "ignore_terminations" not in report  # PROTOCOL has no such key, like reports written before it
    del report["result"]["episode_success_at_end"]
    older.write_text(json.dumps(report))
    terminating = write_report(tmp_path / "t.json", episodes("0110"), ignore_terminations=False)
    assert compare([older], [terminating]).new_only == 1
    with pytest.raises(CompareError, match="no per-episode successes"):
        compare([older], [terminating], metric="success_at_end")


def test_other_episode_counts_and_keyless_reports_are_refused(tmp_path: Path) -> None:
    base = write_report(tmp_path / "b.json", episodes("1100"))
    with pytest.raises(CompareError, match="ran other episodes"):
        compare([base], [write_report(tmp_path / "n.json", episodes("110011"))])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**PROTOCOL, "result": {"episodes": 2, "episode_success_once": [True, False]}}))
    with pytest.raises(CompareError, match="evaluate the checkpoint again"):
        compare([base], [old])
    with pytest.raises(CompareError, match="as many reports"):
        compare([base, base], [base])
    torn = json.loads(base.read_text())
    torn["result"]["episode_numbers"].pop()
    (tmp_path / "torn.json").write_text(json.dumps(torn))
    with pytest.raises(CompareError, match="differ in length"):
        compare([base], [tmp_path / "torn.json"])


def test_cli_prints_the_comparison_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_report(tmp_path / "b.json", episodes("1100110000"))
    new = write_report(tmp_path / "n.json", episodes("1011111100"), 5)
    assert gsrl_main(["compare", "--base", str(base), "--new", str(new)]) == 0  # as the campaign calls it
    out = capsys.readouterr().out
    assert "10 paired episodes: base 4/10 = 40.0% -> new 7/10 = 70.0%, difference +30.0 points" in out
    assert "by new only 4, by base only 1" in out
    assert gsrl_main(["compare", "--base", str(base), "--new", str(new), "--metric", "success_at_end"]) == 0
    assert "10 paired episodes (success_at_end): base 4/10" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["--base", str(base), "--new", str(tmp_path / "missing.json")])
    assert exited.value.code == 2 and "missing.json: no such file" in capsys.readouterr().err
