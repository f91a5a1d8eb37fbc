"""README figures that come from the benchmark are links to bench/RESULTS.md (or bench/RESULTS-gpu.md) whose
numbers are in that file, and no paragraph that cites a results file carries a figure outside such a link: a
rerun that moves a figure fails here until the README says the new one."""

import re

from helpers import ROOT

LINK = re.compile(r"\[([^\]]+)\]\((bench/RESULTS(?:-gpu)?\.md)\)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])|(?<![\w.])\d+(?:\.\d+)?x(?!\w)")  # 0.263, 1.5x


def paragraphs() -> list[str]:
    return re.split(r"\n\s*\n", (ROOT / "README.md").read_text())


def test_every_linked_figure_is_in_its_results_file():
    linked = [(text, target) for p in paragraphs() for text, target in LINK.findall(p)]
    assert len(linked) >= 8, linked
    for text, target in linked:
        numbers = set(NUMBER.findall((ROOT / target).read_text()))
        for number in NUMBER.findall(text):
            assert number in numbers, f"README quotes {text!r} from {target}, which has no {number}"


def test_paragraphs_citing_the_results_carry_no_figure_outside_a_link():
    for paragraph in paragraphs():
        if "RESULTS" not in paragraph or paragraph.lstrip().startswith(("```", "|")):
            continue
        outside = FIGURE.findall(LINK.sub("", paragraph))
        assert not outside, f"figures {outside} beside a results citation but not linked to it:\n{paragraph}"
