"""README figures that come from the benchmark are links to bench/RESULTS.md (or bench/RESULTS-gpu.md) whose
numbers are in that file, and no sentence that cites a results file carries a figure outside such a link: a
rerun that moves a figure fails here until the README says the new one."""

import re

from helpers import ROOT

LINK = re.compile(r"\[([^\]]+)\]\((bench/RESULTS(?:-gpu)?\.md)\)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])|(?<![\w.])\d+(?:\.\d+)?x(?!\w)")  # 0.263, 1.5x


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`*\[-])")


def paragraphs() -> list[str]:
    return re.split(r"\n\s*\n", (ROOT / "README.md").read_text())


def sentences(paragraph: str) -> list[str]:
    return SENTENCE_END.split(paragraph)


def test_every_linked_figure_is_in_its_results_file():
    linked = [(text, target) for p in paragraphs() for text, target in LINK.findall(p)]
    assert len(linked) >= 8, linked
    for text, target in linked:
        numbers = set(NUMBER.findall((ROOT / target).read_text()))
        for number in NUMBER.findall(text):
            assert number in numbers, f"README quotes {text!r} from {target}, which has no {number}"


def test_sentences_citing_the_results_carry_no_figure_outside_a_link():
    for paragraph in paragraphs():
        if paragraph.lstrip().startswith(("```", "|")):
            continue
        for sentence in sentences(paragraph):
            if "RESULTS" not in sentence:
                continue
            outside = FIGURE.findall(LINK.sub("", sentence))
            assert not outside, f"figures {outside} beside a results citation but not linked to it:\n{sentence}"


def test_the_check_catches_a_figure_copied_beside_a_citation():
    """The rule above on two made-up sentences: a copied figure fails it, a linked one passes."""
    copied = "Two workers took 1.58x the memory (see `bench/RESULTS.md`)."
    linked = "Two workers took [1.58x](bench/RESULTS.md) the memory."
    assert FIGURE.findall(LINK.sub("", copied)) == ["1.58x"] and FIGURE.findall(LINK.sub("", linked)) == []
    assert sentences("It took 2.0 s. The file `bench/RESULTS.md` has it, 0.5x.") == [
        "It took 2.0 s.", "The file `bench/RESULTS.md` has it, 0.5x."]
