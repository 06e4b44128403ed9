import re

import pytest
from typer.testing import CliRunner

from bnkit.cli import app
from bnkit.cli.ema import MAX_STEPS

runner = CliRunner()


def _rows(output):
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 4 and cells[0].isdigit():
            rows[int(cells[0])] = [float(c) for c in cells[1:]]
    return rows


def test_ema_prints_the_lesson_table_computed():
    result = runner.invoke(app, ["ema", "4.2", "3.8", "4.1", "--fill", "4.0", "--steps", "50", "--decay", "0.9"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert set(rows) >= {1, 2, 3, 10, 50}
    v, t = 0.0, 0
    for t, m in enumerate([4.2, 3.8, 4.1] + [4.0] * 47, start=1):
        v = 0.9 * v + 0.1 * m
        if t in rows:
            assert abs(rows[t][1] - v) < 1e-4 * max(1, abs(v))
            assert abs(rows[t][2] - v / (1 - 0.9**t)) < 1e-4 * max(1, abs(v))


def test_ema_rejects_inconsistent_arguments():
    assert runner.invoke(app, ["ema", "1", "2", "--steps", "5"]).exit_code == 2
    assert runner.invoke(app, ["ema", "1", "2", "--steps", "1"]).exit_code == 2
    unused = runner.invoke(app, ["ema", "1", "--fill", "2"], terminal_width=200)  # nothing left to fill
    assert unused.exit_code == 2 and "--fill has no batch to fill" in unused.output
    assert runner.invoke(app, ["ema", "1", "--decay", "1.5"]).exit_code == 2
    frozen = runner.invoke(app, ["ema", "4.2", "3.8", "--decay", "1", "--init", "7"], terminal_width=200)
    # 1 - 1^t = 0: the running mean stays at 7, the bias-corrected column is the limit, the plain mean (4.2 + 3.8) / 2
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in frozen.output.splitlines() if line.count("│") == 5]
    assert frozen.exit_code == 0 and rows == [["1", "4.2", "7", "4.2"], ["2", "3.8", "7", "4"]]
    bogus = runner.invoke(app, ["ema", "1", "--show", "bogus"], terminal_width=200)
    assert bogus.exit_code == 2 and "--show must be 'auto' or 'all'" in bogus.output
    negative = runner.invoke(app, ["ema", "--fill", "-1", "--steps", "3", "--decay", "0.5", "--", "-4.2", "1"],
                             terminal_width=200)
    # 0.5 * -4.2 = -2.1; 0.5 * -2.1 + 0.5 * 1 = -0.55; 0.5 * -0.55 + 0.5 * -1 = -0.775
    assert negative.exit_code == 0 and "-2.1" in negative.output and "-0.775" in negative.output


@pytest.mark.parametrize("args,match", [
    (["4.2", "nan", "3"], "batch mean #2 is nan"),
    (["4.2", "inf"], "batch mean #2 is inf"),
    (["4.2", "--fill", "-inf", "--steps", "5"], "--fill is -inf"),
    (["4.2", "--init", "nan"], "--init is nan"),
])
def test_ema_rejects_non_finite_values(args, match):
    result = runner.invoke(app, ["ema", *args], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert "finite" in result.output


def test_ema_caps_steps_and_says_so():
    result = runner.invoke(app, ["ema", "4.2", "--fill", "4", "--steps", "1000000"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert f"maximum of {MAX_STEPS}" in result.output
    ok = runner.invoke(app, ["ema", "4.2", "--fill", "4", "--steps", str(MAX_STEPS)], terminal_width=200)
    assert ok.exit_code == 0, ok.output
    assert MAX_STEPS in _rows(ok.output)
    help_text = runner.invoke(app, ["ema", "--help"], terminal_width=200).output
    assert f"at most {MAX_STEPS}" in " ".join(help_text.split())


def test_ema_prints_the_batch_means_as_given():
    result = runner.invoke(app, ["ema", "12345.67", "4.23456", "--decay", "0.5"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows[1][0] == 12345.67 and rows[2][0] == 4.23456
    assert rows[2][1] == pytest.approx(0.5 * 0.5 * 12345.67 + 0.5 * 4.23456, rel=1e-5)


def test_the_title_states_the_rule_the_rows_follow():
    """The title's rule was never read: written with the decay on the batch mean, it told users the opposite of
    what the table computes. The weights it states are applied here to the given batch means and must give the
    printed running means (decay 0.7: the two sides differ)."""
    result = runner.invoke(app, ["ema", "4.2", "3.8", "4.1", "--decay", "0.7", "--init", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    title = " ".join(result.output.split("┏")[0].split())
    rule = re.search(r"running = ([0-9.]+) \* running \+ ([0-9.]+) \* batch_mean \(start ([0-9.]+)\)", title)
    assert rule, title
    old, new, start = map(float, rule.groups())
    assert (old, new, start) == pytest.approx((0.7, 0.3, 1.0))
    rows, v = _rows(result.output), start
    for t, m in enumerate([4.2, 3.8, 4.1], start=1):
        v = old * v + new * m
        assert rows[t][1] == pytest.approx(v, rel=1e-5)
    result = runner.invoke(app, ["ema", "1", "--decay", "0.12345"], terminal_width=200)  # weights that add up to 1
    assert "running = 0.12345 * running + 0.87655 * batch_mean" in " ".join(result.output.split()), result.output


def test_the_titles_batch_weight_is_the_one_the_rows_use_for_a_decay_next_to_1():
    """The title showed the decimal complement of the decay (1e-16) while the rows weigh the batch by the float
    1 - decay (1.1102230246251565e-16, as Keras computes it): the title misstated the rule (review)."""
    result = runner.invoke(app, ["ema", "1", "--decay", "0.9999999999999999"], terminal_width=200)
    assert result.exit_code == 0, result.output
    title = " ".join(result.output.split("┏")[0].split())
    new = float(re.search(r"\+ (\S+) \* batch_mean", title).group(1))
    assert new == pytest.approx(1.0 - 0.9999999999999999, rel=1e-14, abs=0)
    assert _rows(result.output)[1][1] == pytest.approx(new * 1.0, rel=1e-5, abs=0)
